"""Reading one sample out of a shard, never raising on bad data: the tar index (tolerant of a
truncated file) and the decode-and-validate step, which returns a skip reason instead of a sample
for each kind of damage the data module counts."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from typing import Callable

from r1v3.chat import count_image_marks

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
REQUIRED_FIELDS = ("question", "answer")


TRUNCATED = "__truncated__"  # index marker: the member's bytes run past the end of the file
UNSAFE = "__unsafe_name__"  # index marker: an absolute or ``..`` member name


def unsafe_name(name: str) -> bool:
    """A member name that would point outside a directory it were extracted into: absolute, or
    with a ``..`` part. Nothing is ever extracted, but such a shard was not written by a tool that
    can be trusted with its other contents either."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] in file order, grouping members by key as WebDataset does
    (key = name up to the first dot of the basename).

    A truncated tar (an interrupted copy or write) keeps the members read before the damage; a
    member whose bytes run past the end is marked so that reading it skips and counts it.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                key, _, ext = base.partition(".")
                entry = samples.setdefault(os.path.join(dirname, key), {})
                entry[ext] = (member.offset_data, member.size)
                if unsafe_name(member.name):
                    entry[UNSAFE] = (0, 0)
                if member.offset_data + member.size > file_size:
                    entry[TRUNCATED] = (0, 0)
    except (tarfile.TarError, EOFError, OSError) as err:
        if not samples:
            raise FileNotFoundError(f"{path} is not a readable tar file ({err})") from err
        log.warning("%s is damaged after %d samples (%s); reading those and skipping the rest", path,
                    len(samples), err)
    return list(samples.items())


def decode_sample(key: str, members: dict, read: Callable[[str], bytes]) -> tuple[dict | None, str]:
    """(sample, "") or (None, reason). Never raises on bad data."""
    if UNSAFE in members:
        return None, "unsafe_member_name"
    if TRUNCATED in members:
        return None, "truncated_shard"
    if "json" not in members:
        return None, "missing_json"
    try:
        text = read("json").decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    try:
        record = json.loads(text)
    except ValueError:
        return None, "bad_json"
    if not isinstance(record, dict):
        return None, "bad_json"
    if any(record.get(f) in (None, "") for f in REQUIRED_FIELDS):
        return None, "missing_field"
    if not _field_types_ok(record):
        return None, "wrong_field_type"
    image_keys = sorted((e for e in members if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS),
                        key=lambda e: int("".join(c for c in e.split(".")[0] if c.isdigit()) or 0))
    expected = record.get("n_images", len(image_keys))
    if len(image_keys) < expected:
        return None, "missing_image"
    image_keys = image_keys[:expected]
    marks = count_image_marks(record["question"])
    if marks and marks != len(image_keys):  # unmarked questions get their images up front
        return None, "placeholder_mismatch"
    images = []
    for ext in image_keys:
        image, reason = _decode_image(read(ext))
        if image is None:
            return None, reason
        images.append(image)
    record["images"] = images
    record.setdefault("id", os.path.basename(key))
    record["answer"] = str(record["answer"])
    return record, ""


def _field_types_ok(record: dict) -> bool:
    options = record.get("options")
    return (isinstance(record["question"], str)
            and isinstance(record["answer"], (str, int, float)) and not isinstance(record["answer"], bool)
            and (options is None or (isinstance(options, list) and all(isinstance(o, (str, int, float)) for o in options)))
            and isinstance(record.get("n_images", 0), int) and record.get("n_images", 0) >= 0)


def _decode_image(data: bytes):
    """(RGB image, "") or (None, reason). Pillow's decompression-bomb guard is made strict: above
    Image.MAX_IMAGE_PIXELS it only warns (raising at twice that), and a warned image would still be
    decoded into memory, so any image over the limit is skipped."""
    import warnings

    from PIL import Image

    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return img.convert("RGB"), ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large"
    except Exception:  # PIL raises many types on corrupt or non-image bytes  # noqa: BLE001
        return None, "bad_image"
