"""The corrupt-shard catalogue: every kind of damage is skipped and counted, and training goes on."""

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from r1v3.data_modules import webdata
from r1v3.data_modules.samples import index_shard


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def good_samples(synth_dir, n):
    stream = webdata.ShardStream(webdata.load_sources(str(synth_dir / "val")), 4)
    return [s for b in stream for s in b["samples"]][:n]


UNSAFE_NAMES = ("/tmp/r1v3-absolute", "../r1v3-parent", "a/../../r1v3-nested", "C:/r1v3-drive")


def write_catalogue_shard(path: Path, good: list[dict]) -> dict[str, int]:
    """Good samples interleaved with one sample per kind of damage; returns the expected skips."""
    image = png_bytes(good[0]["images"][0])
    record = {k: v for k, v in good[0].items() if k != "images"}
    # Over Pillow's MAX_IMAGE_PIXELS (89.5M) yet tiny on disk: a 1-bit blank 9,500 × 9,500 PNG.
    bomb = png_bytes(Image.new("1", (9500, 9500)))
    bad = {
        "zero_byte": ({**record}, [b""], "empty_image"),
        "not_image": ({**record}, [b"this is a text file, not a PNG"], "bad_image"),
        "bomb": ({**record}, [bomb], "image_too_large"),
        "wrong_type_q": ({**record, "question": 42}, [image], "wrong_field_type"),
        "wrong_type_opt": ({**record, "options": "A or B"}, [image], "wrong_field_type"),
        "more_images": ({**record, "question": "<image> How many?", "n_images": 2}, [image, image],
                        "placeholder_mismatch"),
        "fewer_images": ({**record, "question": "<image> and <image>: how many?", "n_images": 1}, [image],
                         "placeholder_mismatch"),
    }
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(good):
            add(tar, f"good{i}.json", json.dumps({k: v for k, v in sample.items() if k != "images"}).encode())
            add(tar, f"good{i}.img0.png", png_bytes(sample["images"][0]))
        for key, (rec, images, _) in bad.items():
            add(tar, f"{key}.json", json.dumps(rec).encode())
            for j, data in enumerate(images):
                add(tar, f"{key}.img{j}.png", data)
        add(tar, "latin1.json", json.dumps(record).encode().replace(b'"question": "', b'"question": "\xff\xfe'))
        add(tar, "latin1.img0.png", image)
        for name in UNSAFE_NAMES:  # otherwise good samples under names that leave the directory
            add(tar, f"{name}.json", json.dumps(record).encode())
            add(tar, f"{name}.img0.png", image)
    expected = {"unsafe_member_name": len(UNSAFE_NAMES)}
    for _, _, reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["not_utf8"] = 1
    return expected


def write_truncated_shard(path: Path, good: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(good):
            add(tar, f"t{i}.json", json.dumps({k: v for k, v in sample.items() if k != "images"}).encode())
            add(tar, f"t{i}.img0.png", png_bytes(sample["images"][0]))
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])  # cut inside the last image


def test_truncated_tar_keeps_what_precedes_the_damage(tmp_path, synth_dir):
    good = good_samples(synth_dir, 4)
    write_truncated_shard(tmp_path / "cut-000000.tar", good)
    index = index_shard(str(tmp_path / "cut-000000.tar"))
    assert [k for k, _ in index] == ["t0", "t1", "t2", "t3"]
    assert "__truncated__" in index[-1][1] and all("__truncated__" not in m for _, m in index[:-1])


def test_every_kind_of_damage_is_skipped_and_counted_while_training_finishes(tmp_path, synth_dir, tiny_dirs):
    from lightning.pytorch import Trainer

    from r1v3.stages.sft import SFTStage

    good = good_samples(synth_dir, 16)
    expected = write_catalogue_shard(tmp_path / "bad-000000.tar", good[:12])
    write_truncated_shard(tmp_path / "bad-000001.tar", good[12:16])
    expected["truncated_shard"] = 1
    dm = webdata.WebDataModule(train=str(tmp_path / "bad-{000000..000001}.tar"), batch_size=4)
    model = SFTStage(str(tiny_dirs["internvl"]), val_generate=False)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    planned = 12 + 8 + len(UNSAFE_NAMES) + 4  # good + bad in the first shard, then the truncated shard's samples
    assert trainer.global_step == planned // 4, "no batch lost: every planned batch trained"
    assert model.skipped == expected
    # read in place, never extracted: nothing of those names appeared where they point
    places = {Path("/tmp"), tmp_path, tmp_path.parent, Path.cwd(), Path.cwd().parent}
    leaked = [p for d in places for p in d.iterdir() if p.name.startswith(("r1v3-absolute", "r1v3-parent", "r1v3-nested", "r1v3-drive", "C:"))]
    assert not leaked, leaked
    assert trainer.logged_metrics["data/skipped"] == sum(expected.values())
