import io
import json
import math
import re
import tarfile
from collections import Counter, deque

import numpy as np
import pytest

from r1v3.data_modules import synthetic as S
from r1v3.tools.datasets import synth_main

TRIGGERS = re.compile(r"\b(Wait|Hmm|Alternatively|But)\b")
DIFFICULTIES = (1, 2, 3)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels(sample):
    return np.asarray(sample["images"][0].convert("RGB"), dtype=np.int16)


def components(mask):
    """Number of 8-connected blobs in a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return n


def colour_mask(arr, rgb):
    return np.all(arr == np.array(rgb, dtype=np.int16), axis=-1)


def ink_mask(arr):
    return np.any(arr != arr[0, 0], axis=-1)


def samples_of(task, n=40):
    return [S.make_sample(task, 5, i, d) for d in DIFFICULTIES for i in range(n)]


def test_determinism():
    for task in S.TASKS:
        a, b = S.make_sample(task, 3, 11, 2), S.make_sample(task, 3, 11, 2)
        assert png_bytes(a["images"][0]) == png_bytes(b["images"][0])
        assert {k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}
        others = [S.make_sample(task, 3, i, 2) for i in range(12, 16)] + [S.make_sample(task, 4, 11, 2)]
        assert all(png_bytes(o["images"][0]) != png_bytes(a["images"][0]) or o["question"] != a["question"]
                   for o in others)


def test_generate_is_deterministic_and_balanced():
    def key(s):
        return s["id"], s["trace"], png_bytes(s["images"][0])

    first = [key(s) for s in S.generate(20, ["count", "colour"], 9, (1, 2))]
    assert first == [key(s) for s in S.generate(20, ["count", "colour"], 9, (1, 2))]
    mix = Counter((s["subject"], s["difficulty"]) for s in S.generate(40, ["count", "colour"], 9, (1, 2)))
    assert mix == {("count", 1): 10, ("count", 2): 10, ("colour", 1): 10, ("colour", 2): 10}


@pytest.mark.parametrize("task", list(S.TASKS))
def test_sample_shape(task):
    for s in samples_of(task, 10):
        assert "." not in s["id"] and s["source"] == "synthetic" and s["subject"] == task
        assert s["question"].startswith("<image>\n") and s["question"].count("<image>") == 1
        assert len(s["images"]) == 1 and s["images"][0].size == (64, 64) and s["images"][0].mode == "RGB"
        assert "boxed" not in s["trace"] and len(s["trace"].split()) <= 30
        if s["options"] is not None:
            lines = s["question"].splitlines()[-len(s["options"]):]
            assert lines == [f"{S.LETTERS[i]}. {o}" for i, o in enumerate(s["options"])]
            assert s["answer"] in S.LETTERS[:len(s["options"])]


def test_count_matches_pixels():
    for s in samples_of("count"):
        target = re.search(r"many (\w+) shapes", s["question"]).group(1)
        arr = pixels(s)
        assert components(colour_mask(arr, S.PALETTE[target])) == int(s["answer"])
        if s["difficulty"] == 1:
            assert components(ink_mask(arr)) == int(s["answer"])  # no distractors
            assert 1 <= int(s["answer"]) <= 4


def test_count_shapes_are_visible():
    for s in samples_of("count", 10):
        arr = pixels(s)
        for rgb in S.PALETTE.values():
            mask = colour_mask(arr, rgb)
            # A blob of >= 50 px is at least about 8x8, visible at 64 px.
            assert mask.sum() >= 50 * components(mask)


def read_seven_segment(mask):
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h = y1 - y0 + 1
    if (x1 - x0 + 1) < h / 4:
        return 1
    mx, my = (x0 + x1) // 2, (y0 + y1) // 2
    probes = {"a": (y0 + 1, mx), "g": (my, mx), "d": (y1 - 1, mx), "f": (y0 + h // 4, x0 + 1),
              "b": (y0 + h // 4, x1 - 1), "e": (y0 + 3 * h // 4, x0 + 1), "c": (y0 + 3 * h // 4, x1 - 1)}
    lit = "".join(sorted(seg for seg, (y, x) in probes.items() if mask[y, x]))
    decoded = {"".join(sorted(v)): d for d, v in S.SEGMENTS.items()}
    return decoded[lit]


def test_add_digits_matches_pixels():
    assert len({"".join(sorted(v)) for v in S.SEGMENTS.values()}) == 10
    for s in samples_of("add_digits"):
        ink = ink_mask(pixels(s))
        left, right = read_seven_segment(ink[:, :32]), read_seven_segment(ink[:, 32:])
        assert int(s["answer"]) == left + right
        assert s["trace"].startswith(f"The left digit is {left} and the right digit is {right}.")


def test_compare_bars_matches_pixels():
    gaps = {d: [] for d in DIFFICULTIES}
    for s in samples_of("compare_bars"):
        arr = pixels(s)
        bar = ink_mask(arr) & ~colour_mask(arr, S.GREY)
        heights = [int(bar[:, :32].any(axis=1).sum()), int(bar[:, 32:].any(axis=1).sum())]
        assert heights[0] != heights[1] and min(heights) >= 8
        ask = "taller" if "taller" in s["question"] else "shorter"
        want = int(np.argmax(heights) if ask == "taller" else np.argmin(heights))
        assert s["answer"] == "AB"[want] and s["options"] == ["left", "right"]
        gaps[s["difficulty"]].append(abs(heights[0] - heights[1]))
    assert min(gaps[1]) > max(gaps[2]) and min(gaps[2]) > max(gaps[3])


def test_colour_matches_pixels():
    for s in samples_of("colour"):
        arr = pixels(s)
        named = s["options"]["ABCD".index(s["answer"])]
        assert colour_mask(arr, S.PALETTE[named]).sum() == ink_mask(arr).sum() > 300
        if s["difficulty"] == 1:
            assert s["options"] == list(S.EASY_COLOURS)


def test_clock_matches_pixels():
    hours = Counter()
    for s in samples_of("clock"):
        arr = pixels(s)
        ys, xs = np.nonzero(colour_mask(arr, S.INK))
        far = np.argmax((ys - 32) ** 2 + (xs - 32) ** 2)
        angle = math.degrees(math.atan2(xs[far] - 32, 32 - ys[far])) % 360
        hour = round(angle / 30) % 12 or 12
        assert str(hour) == s["answer"]
        hours[(s["difficulty"], hour)] += 1
    assert {h for d, h in hours if d == 1} == {12, 3, 6, 9}
    assert len({h for d, h in hours if d == 3}) > 4


def test_reflection_fraction():
    batch = [S.make_sample(t, 1, i) for t in S.TASKS for i in range(80)]
    frac = sum(bool(TRIGGERS.search(s["trace"])) for s in batch) / len(batch)
    assert 0.35 < frac < 0.65
    none = [S.make_sample(t, 1, i, 2, reflect=0.0) for t in S.TASKS for i in range(30)]
    every = [S.make_sample(t, 1, i, 2, reflect=1.0) for t in S.TASKS for i in range(30)]
    assert not any(TRIGGERS.search(s["trace"]) for s in none)
    assert all(TRIGGERS.search(s["trace"]) for s in every)
    # The fraction changes only the text, never the picture.
    assert [png_bytes(s["images"][0]) for s in none] == [png_bytes(s["images"][0]) for s in every]


def test_corpus():
    texts = S.corpus(50, seed=1)
    assert len(texts) == 50 and texts == S.corpus(50, seed=1)
    assert all("<think>" in t and "</think> The answer is \\boxed{" in t and t.endswith("}.") for t in texts)
    assert S.render_target("x", "4") == "<think>x</think> The answer is \\boxed{4}."
    assert any("clock" in t for t in texts) and any("colour" in t for t in texts)


def _tar_samples(paths):
    out = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_write_synthetic_splits(tmp_path):
    stats = S.write_synthetic(tmp_path, n_train=40, n_val=12, n_ood=8, seed=2, maxcount=16,
                              train_tasks=("count", "colour"))
    assert {k: v["written"] for k, v in stats.items()} == {"train": 40, "val": 12, "ood": 8}
    assert len(stats["train"]["shards"]) == 3
    assert (tmp_path / "train" / "synth-000000.tar").is_file()
    split = {k: _tar_samples(v["shards"]) for k, v in stats.items()}
    content = {k: {(json.loads(f["json"])["question"], f["img0.png"]) for f in v.values()} for k, v in split.items()}
    assert not content["train"] & content["val"]
    assert not set(split["train"]) & set(split["val"])
    ood = [json.loads(f["json"]) for f in split["ood"].values()]
    assert {m["subject"] for m in ood} == {"clock"} and all(m["n_images"] == 1 for m in ood)
    assert all("trace" in json.loads(f["json"]) for f in split["train"].values())


def test_synth_cli(tmp_path, capsys):
    rc = synth_main(["--out", str(tmp_path), "--n-train", "6", "--n-val", "2", "--n-ood", "2",
                       "--tasks", "count,colour", "--difficulty", "1,2", "--seed", "4"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["train"]["written"] == 6 and summary["ood"]["written"] == 2


@pytest.mark.parametrize("args", [["--tasks", "count,nope"], ["--difficulty", "0"], ["--size", "8"],
                                  ["--difficulty", "x"], []])
def test_synth_cli_errors(tmp_path, capsys, args):
    argv = (["--out", str(tmp_path)] if args else []) + args
    assert synth_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("r1v3 synth: error:")
