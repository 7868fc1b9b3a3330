import io
import json
import tarfile
from collections import defaultdict

import pytest
from PIL import Image

from r1v3.data_modules.shards import (
    Skip,
    from_geometry3k,
    from_jsonl,
    from_mmmu,
    sanitize_key,
    write_shards,
)
from r1v3.tools.datasets import shards_main


def _png(path, colour=(200, 10, 10), fmt="PNG"):
    Image.new("RGB", (16, 12), colour).save(path, format=fmt)
    return path


def read_samples(paths):
    """Group tar members by key the way webdataset does (key = name before the first dot)."""
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            groups = defaultdict(dict)
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups[key][ext] = tar.extractfile(m).read()
        for key, files in groups.items():
            assert key not in samples
            samples[key] = files
    return samples


def _jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(r if isinstance(r, str) else json.dumps(r))
            fh.write("\n")
    return path


def test_sanitize_key():
    assert sanitize_key("validation_Math.12/a b") == "validation_Math_12_a_b"
    long = sanitize_key("x" * 300)
    assert len(long) <= 80 and long != sanitize_key("x" * 299)


def test_roundtrip_image_kinds(tmp_path):
    jpg = _png(tmp_path / "a.jpg", fmt="JPEG")
    png = _png(tmp_path / "b.png", (0, 0, 255))
    raw = (jpg.read_bytes(), "jpg")
    pil = Image.new("RGB", (8, 8), (0, 255, 0))
    samples = [
        {"id": "s.1", "question": "<image>\n<image>\nQ?", "answer": "A", "options": ["x", "y"],
         "trace": "t", "subject": "math", "difficulty": 2, "source": "test", "images": [pil, str(jpg)]},
        {"id": "s2", "question": "<image> and <image>", "answer": 7, "images": [raw, png]},
    ]
    stats = write_shards(samples, str(tmp_path / "out" / "train-%06d.tar"))
    assert stats["written"] == 2 and stats["skipped"] == 0 and stats["reasons"] == {}
    assert len(stats["shards"]) == 1
    got = read_samples(stats["shards"])
    assert set(got) == {"s_1", "s2"}
    assert set(got["s_1"]) == {"json", "img0.png", "img1.jpg"}
    assert got["s_1"]["img1.jpg"] == jpg.read_bytes()  # original encoding kept
    meta = json.loads(got["s_1"]["json"])
    assert meta == {"id": "s.1", "question": "<image>\n<image>\nQ?", "answer": "A", "options": ["x", "y"],
                    "trace": "t", "subject": "math", "difficulty": 2, "source": "test", "n_images": 2}
    meta2 = json.loads(got["s2"]["json"])
    assert meta2["answer"] == "7" and "options" not in meta2 and "trace" not in meta2
    assert set(got["s2"]) == {"json", "img0.jpg", "img1.png"}
    assert Image.open(io.BytesIO(got["s_1"]["img0.png"])).getpixel((0, 0)) == (0, 255, 0)
    for files in got.values():
        for ext, data in files.items():
            if ext != "json":
                Image.open(io.BytesIO(data)).load()


def test_maxcount_splits_and_keys_unique(tmp_path):
    samples = [{"id": "same", "question": "q", "answer": "1", "images": []} for _ in range(5)]
    stats = write_shards(samples, str(tmp_path / "s-%06d.tar"), maxcount=2)
    assert stats["written"] == 5 and len(stats["shards"]) == 3
    assert stats["shards"][0].endswith("s-000000.tar")
    assert len(read_samples(stats["shards"])) == 5


def test_skips_are_counted(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    samples = [
        {"id": "ok", "question": "<image>", "answer": "1", "images": [_png(tmp_path / "ok.png")]},
        {"id": "gone", "question": "<image>", "answer": "1", "images": [tmp_path / "nope.png"]},
        {"id": "broken", "question": "<image>", "answer": "1", "images": [bad]},
        {"id": "mismatch", "question": "no placeholder", "answer": "1", "images": [tmp_path / "ok.png"]},
        {"id": "noanswer", "question": "q", "answer": "", "images": []},
        Skip("bad_json", "line 3"),
    ]
    stats = write_shards(samples, str(tmp_path / "x-%06d.tar"))
    assert stats["written"] == 1 and stats["skipped"] == 5
    assert stats["reasons"] == {"missing_image": 1, "unreadable_image": 1, "placeholder_mismatch": 1,
                                "missing_field": 1, "bad_json": 1}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipped 5 of 6")


def test_nothing_written_leaves_no_empty_shard(tmp_path):
    stats = write_shards([Skip("bad_json")], str(tmp_path / "e-%06d.tar"))
    assert stats["written"] == 0 and stats["shards"] == []
    assert not list(tmp_path.glob("*.tar"))


def test_bad_pattern(tmp_path):
    with pytest.raises(ValueError, match="pattern"):
        write_shards([], str(tmp_path / "nopattern.tar"))


def test_webdataset_reads_back(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = [{"id": f"k{i}", "question": "<image>", "answer": str(i),
                "images": [Image.new("RGB", (4, 4))]} for i in range(3)]
    stats = write_shards(samples, str(tmp_path / "w-%06d.tar"))
    got = list(wds.WebDataset(stats["shards"], shardshuffle=False))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"]
    assert all(set(s) >= {"json", "img0.png"} for s in got)


def test_from_jsonl(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    _png(img / "a.png")
    _png(img / "b.png")
    src = _jsonl(tmp_path / "gen.jsonl", [
        {"id": "one", "question": "What is shown?", "answer": "cat", "images": ["a.png", "b.png"]},
        {"question": "<image> Count.", "answer": 3, "image": "a.png", "trace": "think"},
        "{not json",
        {"question": "no answer", "images": []},
        {"question": "<image> <image>", "answer": "x", "image": "a.png"},
        {"question": "<image>", "answer": "y", "image": "missing.png"},
    ])
    items = list(from_jsonl(src, img))
    first = items[0]
    assert first["question"] == "<image>\n<image>\nWhat is shown?"
    assert [p.name for p in first["images"]] == ["a.png", "b.png"]
    assert items[1]["id"] == "gen_2" and items[1]["answer"] == "3" and items[1]["trace"] == "think"
    stats = write_shards(items, str(tmp_path / "o-%06d.tar"))
    assert stats["written"] == 2
    assert stats["reasons"] == {"bad_json": 1, "missing_field": 1, "placeholder_mismatch": 1, "missing_image": 1}


def test_from_mmmu(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for name in ("one.png", "two.png", "three.png"):
        _png(img / name)
    src = _jsonl(tmp_path / "mmmu.jsonl", [
        {"id": "validation_Art_Theory_3", "question": "Compare <image 2> with <image 1>.",
         "options": "['left', 'right', \"it's both\"]", "answer": "B",
         "image_1": "one.png", "image_2": "two.png"},
        {"id": "validation_Math_12", "question": "Which graph matches <image 1>?",
         "options": ["<image 2>", "<image 3>"], "answer": "A",
         "image_1": "one.png", "image_2": "two.png", "image_3": "three.png", "topic_difficulty": "Hard"},
        {"id": "validation_Physics_1", "question": "Speed?", "options": "[]", "answer": "3.5 m/s",
         "subject": "Physics"},
        {"id": "validation_Math_13", "question": "<image 1>", "options": "['a', ", "answer": "A",
         "image_1": "one.png"},
        {"id": "validation_Math_14", "question": "<image 1>", "options": "__import__('os').getcwd()",
         "answer": "A", "image_1": "one.png"},
        {"id": "validation_Math_15", "question": "<image 1> and <image 2>", "options": "['a']",
         "answer": "A", "image_1": "one.png"},
        {"id": "validation_Math_16", "question": "<image 1>", "answer": "A", "image_1": "gone.png"},
    ])
    items = list(from_mmmu(src, img))
    a, b, c = items[:3]
    assert a["question"] == "Compare <image> with <image>.\nA. left\nB. right\nC. it's both"
    assert [p.name for p in a["images"]] == ["two.png", "one.png"]
    assert a["options"] == ["left", "right", "it's both"] and a["subject"] == "Art_Theory"
    assert b["question"] == ("Which graph matches <image>?\nA. [image 2]\nB. [image 3]"
                             "\nimage 2: <image>\nimage 3: <image>")
    assert [p.name for p in b["images"]] == ["one.png", "two.png", "three.png"]
    assert b["difficulty"] == "Hard" and b["subject"] == "Math"
    assert c["options"] is None and c["images"] == [] and c["answer"] == "3.5 m/s"
    assert [i.reason for i in items[3:] if isinstance(i, Skip)] == ["bad_options", "bad_options", "missing_image"]
    stats = write_shards(items, str(tmp_path / "m-%06d.tar"))
    assert stats["written"] == 3
    assert stats["reasons"] == {"bad_options": 2, "missing_image": 2}
    got = read_samples(stats["shards"])
    assert json.loads(got["validation_Math_12"]["json"])["n_images"] == 3


def test_from_geometry3k(tmp_path):
    img = tmp_path / "g"
    (img / "7").mkdir(parents=True)
    _png(img / "7" / "img_diagram.png")
    src = _jsonl(tmp_path / "geo.jsonl", [
        {"id": 7, "problem_text": "Find x.", "choices": ["1", "2", "3", "4"], "answer": "C",
         "image": "7/img_diagram.png"},
        {"id": 8, "problem": "<image>Find the area.", "answer": "12.5", "images": ["7/img_diagram.png"]},
        {"id": 9, "problem": "No image here.", "answer": "1"},
        {"id": 10, "answer": "1", "image": "7/img_diagram.png"},
    ])
    items = list(from_geometry3k(src, img))
    assert items[0]["question"] == "<image>\nFind x.\nA. 1\nB. 2\nC. 3\nD. 4"
    assert items[0]["answer"] == "C" and items[0]["options"] == ["1", "2", "3", "4"]
    assert items[1]["question"] == "<image>Find the area." and items[1]["options"] is None
    assert all(i["subject"] == "geometry" and i["source"] == "geometry3k" for i in items[:2])
    stats = write_shards(items, str(tmp_path / "g-%06d.tar"))
    assert stats["written"] == 2 and stats["reasons"] == {"missing_field": 2}


def test_shards_cli(tmp_path, capsys):
    img = tmp_path / "imgs"
    img.mkdir()
    _png(img / "a.png")
    src = _jsonl(tmp_path / "in.jsonl", [{"question": "Q", "answer": "1", "image": "a.png"}, "oops"])
    out = tmp_path / "sh" / "t-%06d.tar"
    rc = shards_main(["--format", "jsonl", "--input", str(src), "--image-root", str(img), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["written"] == 1 and summary["skipped"] == 1 and len(summary["shards"]) == 1


@pytest.mark.parametrize("argv", [
    ["--format", "jsonl", "--input", "MISSING.jsonl", "--image-root", ".", "--out", "o-%06d.tar"],
    ["--format", "parquet", "--input", "x", "--image-root", ".", "--out", "o-%06d.tar"],
    ["--format", "jsonl"],
])
def test_shards_cli_errors(argv, capsys):
    assert shards_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r1v3 shards: error:")


def test_shards_cli_bad_pattern(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [])
    rc = shards_main(["--format", "mmmu", "--input", str(src), "--image-root", str(tmp_path),
                      "--out", str(tmp_path / "plain.tar")])
    assert rc == 2 and "pattern" in capsys.readouterr().err
