import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from r1v3.data_modules import webdata
from r1v3.data_modules.collate import IGNORE_INDEX, PromptTooLongError, VLMCollator


def ids_of(batches):
    return [i for b in batches for i in b["meta"]["id"]]


def make_module(synth_dir, processor, **kw):
    kw.setdefault("batch_size", 8)
    dm = webdata.WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"), **kw)
    dm.processor = processor
    dm.setup("fit")
    return dm


def test_epoch_order_is_deterministic_and_changes_per_epoch(synth_dir, internvl_processor):
    dm = make_module(synth_dir, internvl_processor)
    first = ids_of(dm.train_dataloader())
    again = ids_of(make_module(synth_dir, internvl_processor).train_dataloader())
    assert first == again
    assert len(first) == len(set(first)) == 96
    loader = dm.train_dataloader()
    loader.stream.epoch = 1
    second_epoch = ids_of(loader)
    assert sorted(second_epoch) == sorted(first) and second_epoch != first


def test_ranks_split_disjoint_and_equal(synth_dir, internvl_processor):
    sources = webdata.load_sources(str(synth_dir / "train"))
    per_rank = []
    for rank in range(3):
        stream = webdata.ShardStream(sources, batch_size=5, rank=rank, world_size=3)
        per_rank.append([s["id"] for b in stream for s in b["samples"]])
    assert len({len(r) for r in per_rank}) == 1, "every rank gets the same number of batches"
    assert len(per_rank[0]) == (96 // 3 // 5) * 5
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat))


def test_workers_do_not_change_the_batch_order(synth_dir, internvl_processor):
    dm0 = make_module(synth_dir, internvl_processor, num_workers=0)
    dm2 = make_module(synth_dir, internvl_processor, num_workers=2)
    assert ids_of(dm0.train_dataloader()) == ids_of(dm2.train_dataloader())


def test_sft_labels_cover_only_the_answer(synth_dir, internvl_processor):
    dm = make_module(synth_dir, internvl_processor, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    tok = internvl_processor.tokenizer
    labels, ids = batch["labels"], batch["inputs"]["input_ids"]
    for row in range(labels.shape[0]):
        supervised = ids[row][labels[row] != IGNORE_INDEX]
        text = tok.decode(supervised)
        assert text.startswith("<think>") and text.endswith(tok.eos_token)
        assert "\\boxed{" + batch["meta"]["answer"][row] + "}" in text
        assert "<IMG_CONTEXT>" not in text and "user" not in text
        # padding is masked too
        assert (labels[row][batch["inputs"]["attention_mask"][row] == 0] == IGNORE_INDEX).all()
    # the prompt is left-padded and ends with the assistant header, ready for generate
    prompt = batch["prompt"]["input_ids"]
    assert tok.decode(prompt[0]).endswith("<|im_start|>assistant\n")


def test_overlong_prompt_errors_or_is_counted(synth_dir, internvl_processor):
    samples = [s for b in webdata.ShardStream(webdata.load_sources(str(synth_dir / "val")), 4)
               for s in b["samples"]][:4]
    with pytest.raises(PromptTooLongError, match="max_prompt_length"):
        VLMCollator(internvl_processor, max_prompt_length=10)(samples)
    samples[1] = dict(samples[1], question=samples[1]["question"] + " very long" * 200)
    batch = VLMCollator(internvl_processor, max_prompt_length=200, on_overlong="skip")(samples)
    assert batch["skipped"] == {"prompt_too_long": 1}
    assert batch["inputs"]["input_ids"].shape[0] == 3


def write_mixed_shard(path: Path, good_samples: list[dict]) -> None:
    """Good samples plus truncated image bytes, invalid json, a missing field and a missing image."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, s in enumerate(good_samples):
            png = io.BytesIO()
            s["images"][0].save(png, format="PNG")
            record = {k: v for k, v in s.items() if k != "images"}
            add(f"good{i}.json", json.dumps(record).encode())
            add(f"good{i}.img0.png", png.getvalue())
            if i == 0:
                add("truncated.json", json.dumps(record).encode())
                add("truncated.img0.png", png.getvalue()[:40])
                add("badjson.json", b"{not json")
                add("badjson.img0.png", png.getvalue())
                add("nofield.json", json.dumps({"question": "<image> hi"}).encode())
                add("nofield.img0.png", png.getvalue())
                add("noimage.json", json.dumps(dict(record, n_images=1)).encode())


def test_corrupt_samples_are_skipped_counted_and_training_finishes(tmp_path, synth_dir, tiny_dirs):
    from lightning.pytorch import Trainer

    from r1v3.stages.sft import SFTStage

    good = [s for b in webdata.ShardStream(webdata.load_sources(str(synth_dir / "val")), 4)
            for s in b["samples"]][:12]
    write_mixed_shard(tmp_path / "mixed-000000.tar", good)
    dm = webdata.WebDataModule(train=str(tmp_path / "mixed-000000.tar"), batch_size=4)
    model = SFTStage(str(tiny_dirs["internvl"]), val_generate=False)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4  # 16 planned samples / 4, none of the batches all-bad
    assert model.skipped == {"bad_image": 1, "bad_json": 1, "missing_field": 1, "missing_image": 1}
    assert trainer.logged_metrics["data/skipped"] == 4


RESUME_SCRIPT = r"""
import json, sys
from r1v3.backbone import load_processor
from r1v3.data_modules.webdata import WebDataModule
dm = WebDataModule(train=sys.argv[1], batch_size=8, seed=3)
dm.processor = load_processor(sys.argv[2])
dm.setup("fit")
dm.load_state_dict(json.load(open(sys.argv[3])))
print(json.dumps([i for b in dm.train_dataloader() for i in b["meta"]["id"]]))
"""


def test_resume_in_new_process_yields_exactly_the_rest(tmp_path, synth_dir, tiny_dirs, internvl_processor):
    dm = webdata.WebDataModule(train=str(synth_dir / "train"), batch_size=8, seed=3)
    dm.processor = internvl_processor
    dm.setup("fit")
    full = ids_of(dm.train_dataloader())
    seen = []
    for i, batch in enumerate(dm.train_dataloader()):
        dm.on_before_batch_transfer(batch, 0)  # what the training loop does before a step
        seen += batch["meta"]["id"]
        if i == 4:
            break
    state = tmp_path / "state.json"
    state.write_text(json.dumps(dm.state_dict()))
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(synth_dir / "train"),
                          str(tiny_dirs["internvl"]), str(state)],
                         capture_output=True, text=True, timeout=300, check=True)
    rest = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen + rest == full
    assert len(rest) == len(full) - 40


def test_resume_refuses_another_seed(synth_dir, internvl_processor):
    dm = make_module(synth_dir, internvl_processor)
    with pytest.raises(ValueError, match="seed was 7"):
        dm.load_state_dict({"seed": 7, "world_size": 1, "batch_size": 3, "epoch": 0, "consumed_samples": 6})


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_sees_every_sample_once(synth_dir, before, after):
    """Ranks stop after 3 steps of world ``before``; the rest of the epoch, re-split over ``after``
    ranks (batch size changed too), covers exactly the samples not yet seen."""
    def ranks(world, batch_size, resume=None):
        streams = []
        for rank in range(world):
            stream = webdata.ShardStream(webdata.load_sources(str(synth_dir / "train")), batch_size=batch_size,
                                         seed=5, rank=rank, world_size=world)
            loader = webdata.StatefulLoader(stream)
            loader.resume = resume
            streams.append(iter(loader))
        return streams

    def ids(batch):
        return [s["id"] for s in batch["samples"]]

    seen, position, ranks_before = [], None, ranks(before, 4)
    for _ in range(3):  # the ranks step together
        for stream in ranks_before:
            batch = next(stream)
            seen += ids(batch)
            position = tuple(int(x) for x in batch["position"])
    rest = [i for stream in ranks(after, 3, resume=position) for batch in stream for i in ids(batch)]
    plan_size = len(webdata.epoch_plan(webdata.load_sources(str(synth_dir / "train")), 5, 0, True))
    assert len(seen) == len(set(seen)) == 3 * before * 4 and position == (0, len(seen), 3)
    assert not set(seen) & set(rest) and len(rest) == len(set(rest))
    # everything is seen once, except the last few a drop_last split leaves for the next epoch
    assert plan_size - after * 3 < len(seen) + len(rest) <= plan_size


def test_weighted_mixing(tmp_path, synth_dir):
    sources = webdata.load_sources({str(synth_dir / "train"): 3.0, str(synth_dir / "val"): 1.0})
    plan = webdata.epoch_plan(sources, seed=0, epoch=0, shuffle=True, length=4000)
    share = sum(1 for src, _, _ in plan if src == 0) / len(plan)
    assert 0.7 < share < 0.8
    assert plan == webdata.epoch_plan(sources, seed=0, epoch=0, shuffle=True, length=4000)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        webdata.load_sources(str(tmp_path / "nothing-*.tar"))


def test_multi_image_samples_collate(tmp_path, internvl_processor):
    from PIL import Image

    from r1v3.data_modules.shards import write_shards

    imgs = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    write_shards([{"id": "two", "question": "<image> vs <image>: which is red?", "answer": "A",
                   "options": ["first", "second"], "images": imgs}], str(tmp_path / "mm-%06d.tar"))
    stream = webdata.ShardStream(webdata.load_sources(str(tmp_path)), batch_size=1, drop_last=False,
                                 collate=VLMCollator(internvl_processor))
    batch = next(iter(stream))
    assert batch["images"]["pixel_values"].shape[0] == 2
    ctx = internvl_processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((batch["inputs"]["input_ids"] == ctx).sum()) == 2 * 16
    assert torch.equal(batch["position"], torch.tensor([0, 1, 1]))  # one sample, one batch of the epoch


def test_several_evaluation_sources_are_read_once_each_in_order(synth_dir):
    sources = webdata.load_sources([str(synth_dir / "val"), str(synth_dir / "ood")])
    plan = webdata.epoch_plan(sources, seed=0, epoch=0, shuffle=False)
    assert len(plan) == len(set(plan)) == sources[0].size + sources[1].size
    assert [src for src, _, _ in plan] == [0] * sources[0].size + [1] * sources[1].size


def test_a_question_holding_the_models_image_token_is_one_clear_error(synth_dir, internvl_processor):
    # Left in, the processor expands the real image beside the literal token and the model then
    # finds more image tokens than image features: a crash deep inside its forward.
    from r1v3.errors import UserError

    samples = [s for b in webdata.ShardStream(webdata.load_sources(str(synth_dir / "val")), 2)
               for s in b["samples"]][:2]
    samples[1] = dict(samples[1], question=samples[1]["question"] + " <IMG_CONTEXT>")
    for mode in ("sft", "prompt"):
        with pytest.raises(UserError, match=f"sample {samples[1]['id']!r}: .*<IMG_CONTEXT>"):
            VLMCollator(internvl_processor, mode=mode)(samples)
    assert VLMCollator(internvl_processor, mode="prompt")(samples[:1])["inputs"] is not None
