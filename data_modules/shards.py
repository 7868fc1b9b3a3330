"""WebDataset shard writing and converters from JSONL, MMMU-format and geometry3k-format records.

On disk one sample is ``<key>.json`` plus ``<key>.img0.png``, ``<key>.img1.jpg``, ... in tar shards.
Converters yield plain sample dicts, or a :class:`Skip` marker for a record they could not use, so
that ``write_shards`` can report every dropped record in one place instead of raising mid-run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

IMAGE_TOKEN = "<image>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# USTAR member names are limited; a long id would make tarfile raise halfway through a shard.
_MAX_KEY_LEN = 80
_MMMU_REF = re.compile(r"<image\s*(\d+)>")
_MMMU_MAX_IMAGES = 7
_PIL_TO_EXT = {"PNG": "png", "JPEG": "jpg"}


@dataclass(frozen=True)
class Skip:
    """Marker a converter yields instead of a sample; ``write_shards`` counts it under ``reason``."""

    reason: str
    detail: str = ""


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


# --------------------------------------------------------------------------- writing


def sanitize_key(raw: Any) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw)) or "sample"
    if len(key) > _MAX_KEY_LEN:
        # Truncation alone could merge distinct ids, so keep a digest of the full id.
        digest = hashlib.sha1(str(raw).encode()).hexdigest()[:10]
        key = f"{key[:_MAX_KEY_LEN - 11]}_{digest}"
    return key


def _detect(data: bytes) -> tuple[bytes, str]:
    """Return bytes a loader can decode plus their true extension; re-encode exotic formats as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except Exception as exc:  # PIL raises many unrelated types for corrupt input
        raise _BadSample("unreadable_image", str(exc)) from None
    if fmt in _PIL_TO_EXT:
        return data, _PIL_TO_EXT[fmt]
    # verify() leaves the image unusable, hence the second open.
    with Image.open(io.BytesIO(data)) as im:
        return _png_bytes(im), "png"


def _png_bytes(im: Image.Image) -> bytes:
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _encode_image(item: Any) -> tuple[bytes, str]:
    if isinstance(item, Image.Image):
        return _png_bytes(item), "png"
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (bytes, bytearray)):
        # The declared extension is only a hint: the loader decodes by content, so trust the bytes.
        return _detect(bytes(item[0]))
    if isinstance(item, (bytes, bytearray)):
        return _detect(bytes(item))
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise _BadSample("missing_image", str(path))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _BadSample("unreadable_image", str(exc)) from None
        return _detect(data)
    raise _BadSample("bad_record", f"unsupported image item {type(item).__name__}")


def _build_record(sample: dict, key: str) -> dict:
    question, answer = sample.get("question"), sample.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise _BadSample("missing_field", "question")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _BadSample("missing_field", "answer")
    images = sample.get("images") or []
    if not isinstance(images, (list, tuple)):
        raise _BadSample("bad_record", "images is not a list")
    if question.count(IMAGE_TOKEN) != len(images):
        raise _BadSample("placeholder_mismatch", f"{question.count(IMAGE_TOKEN)} vs {len(images)}")
    options = sample.get("options")
    if options is not None and not (isinstance(options, (list, tuple)) and all(isinstance(o, str) for o in options)):
        raise _BadSample("bad_options", repr(options)[:80])

    rec: dict[str, Any] = {"__key__": key}
    for i, item in enumerate(images):
        data, ext = _encode_image(item)
        rec[f"img{i}.{ext}"] = data
    meta: dict[str, Any] = {
        "id": str(sample["id"]),
        "question": question,
        "answer": answer.strip() if isinstance(answer, str) else str(answer),
        "subject": sample.get("subject") or "",
        "difficulty": sample.get("difficulty"),
        "source": sample.get("source") or "",
        "n_images": len(images),
    }
    if options is not None:
        meta["options"] = list(options)
    if sample.get("trace") is not None:
        meta["trace"] = str(sample["trace"])
    # Other plain fields (e.g. a rejection-sampled response) travel along unchanged.
    for field, value in sample.items():
        if field not in meta and field not in ("images", "options", "trace") and isinstance(
                value, (str, int, float, bool)):
            meta[field] = value
    rec["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return rec


def write_shards(samples: Iterable[dict | Skip], pattern: str, maxcount: int = 1000) -> dict:
    """Write samples to ``pattern % shard_index`` tar shards; bad samples are skipped and counted."""
    import webdataset as wds

    try:
        pattern % 0
    except (TypeError, ValueError):
        raise ValueError(f"shard pattern needs one integer field such as %06d: {pattern!r}") from None
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)

    reasons: Counter[str] = Counter()
    shards: list[str] = []
    used_keys: set[str] = set()
    written = 0
    # mtime is fixed so that the same samples give byte-identical shards (reproducible datasets).
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, encoder=False, mtime=0,
                         post=shards.append) as sink:
        for n, sample in enumerate(samples):
            if isinstance(sample, Skip):
                reasons[sample.reason] += 1
                continue
            if not isinstance(sample, dict):
                reasons["bad_record"] += 1
                continue
            if sample.get("id") in (None, ""):
                sample = {**sample, "id": f"sample_{n:08d}"}
            key = sanitize_key(sample["id"])
            # A repeated key would merge two samples when webdataset groups tar members.
            base, k = key, 1
            while key in used_keys:
                key, k = f"{base}_{k}", k + 1
            try:
                rec = _build_record(sample, key)
            except _BadSample as bad:
                reasons[bad.reason] += 1
                continue
            sink.write(rec)
            used_keys.add(key)
            written += 1
    if written == 0:
        # ShardWriter opens its first shard eagerly; an empty tar would look like a valid split.
        for path in shards:
            Path(path).unlink(missing_ok=True)
        shards = []
    skipped = sum(reasons.values())
    if skipped:
        detail = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items()))
        print(f"warning: skipped {skipped} of {skipped + written} samples ({detail})", file=sys.stderr)
    return {"written": written, "skipped": skipped, "shards": shards, "reasons": dict(reasons)}


# --------------------------------------------------------------------------- converters


def _read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict] | Skip]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Skip("bad_json", f"line {lineno}: {exc}")
                continue
            yield (lineno, rec) if isinstance(rec, dict) else Skip("bad_record", f"line {lineno}")


def _convert(jsonl_path, image_root, one: Callable[[dict, int, Path], dict]) -> Iterator[dict | Skip]:
    for item in _read_jsonl(jsonl_path):
        if isinstance(item, Skip):
            yield item
            continue
        lineno, rec = item
        try:
            yield one(rec, lineno, Path(image_root))
        except _BadSample as bad:
            yield Skip(bad.reason, f"line {lineno}: {bad}")


def _text(rec: dict, *fields: str) -> str:
    for field in fields:
        if isinstance(rec.get(field), str) and rec[field].strip():
            return rec[field]
    raise _BadSample("missing_field", fields[0])


def _answer(rec: dict) -> str:
    raw = rec.get("answer")
    if isinstance(raw, list):  # some MMMU-style dumps wrap the answer in a list
        raw = raw[0] if len(raw) == 1 else ", ".join(map(str, raw))
    if raw is None or not str(raw).strip():
        raise _BadSample("missing_field", "answer")
    return str(raw).strip()


def _options(raw: Any) -> list[str] | None:
    if raw is None or raw == "":
        return None
    try:
        if isinstance(raw, str):
            # literal_eval only builds literals, so a hostile string cannot run code.
            raw = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _BadSample("bad_options", repr(raw)[:60]) from None
    if not isinstance(raw, (list, tuple)) or len(raw) > len(LETTERS):
        raise _BadSample("bad_options", repr(raw)[:60])
    return [str(o) for o in raw] or None


def _paths(rec: dict, root: Path, required: bool = False) -> list[Path]:
    rel = rec.get("images", rec.get("image"))
    rel = [] if rel is None else [rel] if isinstance(rel, str) else rel
    if not isinstance(rel, list) or not all(isinstance(r, str) for r in rel):
        raise _BadSample("bad_record", "images")
    if required and not rel:
        raise _BadSample("missing_field", "image")
    # Absolute paths pass through unchanged: Path join drops the root for them.
    return [root / r for r in rel]


def _fill_placeholders(question: str, n_images: int) -> str:
    have = question.count(IMAGE_TOKEN)
    if have > n_images:
        raise _BadSample("placeholder_mismatch", f"{have} placeholders, {n_images} images")
    return f"{IMAGE_TOKEN}\n" * (n_images - have) + question


def _with_options(question: str, options: list[str] | None) -> str:
    # Synthetic questions carry their options in the text; converted ones follow the same convention.
    if not options:
        return question
    return question.rstrip() + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _jsonl_one(rec: dict, lineno: int, root: Path, stem: str) -> dict:
    question, answer = _text(rec, "question"), _answer(rec)
    paths = _paths(rec, root)
    return {"id": rec.get("id", f"{stem}_{lineno}"), "question": _fill_placeholders(question, len(paths)),
            "answer": answer, "options": _options(rec.get("options")), "trace": rec.get("trace"),
            "subject": rec.get("subject", ""), "difficulty": rec.get("difficulty"),
            "source": rec.get("source", "jsonl"), "images": paths}


def _mmmu_one(rec: dict, lineno: int, root: Path) -> dict:
    question, answer = _text(rec, "question"), _answer(rec)
    options = _options(rec.get("options"))
    order: list[int] = []

    def to_token(m: re.Match) -> str:
        k = int(m.group(1))
        if k in order:
            # A repeated reference would need the same image twice; name it in words instead.
            return f"image {k}"
        order.append(k)
        return IMAGE_TOKEN

    text = _MMMU_REF.sub(to_token, question)
    shown = [_MMMU_REF.sub(lambda m: f"[image {m.group(1)}]", o) for o in options or []] or None
    text = _with_options(text, shown)
    for k in (int(k) for o in options or [] for k in _MMMU_REF.findall(o)):
        if k not in order:
            order.append(k)
            text += f"\nimage {k}: {IMAGE_TOKEN}"
    paths = []
    for k in order:
        ref = rec.get(f"image_{k}") if 1 <= k <= _MMMU_MAX_IMAGES else None
        if not isinstance(ref, str) or not ref:
            raise _BadSample("missing_image", f"image_{k} not given")
        paths.append(root / ref)
    subject = rec.get("subject")
    if not subject:
        # ids look like "validation_Art_Theory_12": split, subject (may contain "_"), number.
        parts = str(rec.get("id", "")).split("_")
        subject = "_".join(parts[1:-1]) if len(parts) >= 3 else ""
    return {"id": rec.get("id", f"mmmu_{lineno}"), "question": text, "answer": answer, "options": shown,
            "trace": rec.get("trace"), "subject": subject,
            "difficulty": rec.get("topic_difficulty", rec.get("difficulty")),
            "source": rec.get("source", "mmmu"), "images": paths}


def _geometry3k_one(rec: dict, lineno: int, root: Path) -> dict:
    problem, answer = _text(rec, "problem", "problem_text"), _answer(rec)
    paths = _paths(rec, root, required=True)
    choices = _options(rec.get("choices"))
    return {"id": rec.get("id", f"geometry3k_{lineno}"),
            "question": _with_options(_fill_placeholders(problem, len(paths)), choices),
            "answer": answer, "options": choices, "trace": rec.get("trace"),
            "subject": rec.get("subject", "geometry"), "difficulty": rec.get("difficulty"),
            "source": rec.get("source", "geometry3k"), "images": paths}


def from_jsonl(jsonl_path: str | os.PathLike, image_root: str | os.PathLike) -> Iterator[dict | Skip]:
    """Generic records: question, answer, images (relative paths) or image, optional extras."""
    stem = sanitize_key(Path(jsonl_path).stem)
    return _convert(jsonl_path, image_root, lambda rec, lineno, root: _jsonl_one(rec, lineno, root, stem))


def from_mmmu(jsonl_path: str | os.PathLike, image_root: str | os.PathLike) -> Iterator[dict | Skip]:
    """MMMU-format records; ``<image k>`` references become ``<image>`` in order of appearance."""
    return _convert(jsonl_path, image_root, _mmmu_one)


def from_geometry3k(jsonl_path: str | os.PathLike, image_root: str | os.PathLike) -> Iterator[dict | Skip]:
    """geometry3k-style records: problem/problem_text, optional choices, answer, image/images."""
    return _convert(jsonl_path, image_root, _geometry3k_one)


CONVERTERS = {"jsonl": from_jsonl, "mmmu": from_mmmu, "geometry3k": from_geometry3k}
