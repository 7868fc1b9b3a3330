"""MMMU-style evaluation: answer scoring, metrics by hand, and EvalStage end to end on real shards
converted from hand-written MMMU records, with a real tiny model."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from r1v3.chat import render_prompt
from r1v3.tools.datasets import shards_main
from r1v3.data_modules.webdata import WebDataModule
from r1v3.evaluation import (NOTHINK_PREFILL, EvalConfigError, EvalMetrics, apply_thinking_mode,
                             banned_token_ids, pass_at_k, question_seed, score_samples)
from r1v3.rewards import R1V3Reward, is_correct
from r1v3.rl.rollout import HFGenerateEngine, Prompt, SamplingConfig
from r1v3.stages.evaluate import EvalStage

REPO = Path(__file__).resolve().parents[1]
MMMU_RECORDS = [
    {"id": "validation_Math_1", "question": "What fraction of <image 1> is shaded?",
     "options": "['1/2', '3/4', '5', '6']", "answer": "A", "image_1": "a.png"},
    {"id": "validation_Math_2", "question": "<image 1> Solve for x.", "options": "[]", "answer": "0.5",
     "image_1": "b.png"},
    {"id": "validation_Physics_3", "question": "Compare <image 2> with <image 1>: which way does it point?",
     "options": ["north", "south", "east", "west"], "answer": "C", "image_1": "a.png", "image_2": "c.png"},
    {"id": "validation_Physics_4", "question": "<image 1> What is the speed in m/s?", "options": "[]",
     "answer": "2", "image_1": "c.png"},
    {"id": "validation_Art_Theory_5", "question": "Who painted <image 1>?", "options": "['Monet', 'Manet', 'Degas']",
     "answer": "B", "image_1": "b.png"},
    {"id": "dev_6", "question": "Which colour dominates <image 1>?", "options": ["red", "green"], "answer": "A",
     "image_1": "a.png", "subject": "Design"},
]


@pytest.fixture(scope="module")
def mmmu_shards(tmp_path_factory):
    """Hand-written MMMU-format JSONL + PNGs, converted by the real `r1v3 shards --format mmmu`."""
    root = tmp_path_factory.mktemp("mmmu")
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.png", "blue")):
        Image.new("RGB", (32, 24), colour).save(root / name)
    src = root / "mmmu.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MMMU_RECORDS))
    assert shards_main(["--format", "mmmu", "--input", str(src), "--image-root", str(root),
                        "--out", str(root / "shards" / "val-%06d.tar"), "--maxcount", "4"]) == 0
    return root / "shards"


def records():
    base = {"validation_Math_1": ("Math", "A", ["1/2", "3/4", "5", "6"]), "validation_Math_2": ("Math", "0.5", None),
            "validation_Physics_3": ("Physics", "C", ["north", "south", "east", "west"])}
    return [{"id": i, "subject": s, "answer": a, "options": o} for i, (s, a, o) in base.items()]


def think(answer_text):
    return f"<think>let me look</think> {answer_text}"


# -- scoring ----------------------------------------------------------------------------------------
def test_answers_are_extracted_and_checked():
    mc = {"id": "q", "subject": "Math", "answer": "A", "options": ["1/2", "3/4", "5", "6"]}
    mc_text_ref = {"id": "r", "subject": "Math", "answer": "3/4", "options": ["1/2", "3/4", "5", "6"]}
    open_half = {"id": "s", "subject": "Math", "answer": "0.5", "options": None}
    open_two = {"id": "t", "subject": "Math", "answer": "2", "options": None}
    open_expr = {"id": "u", "subject": "Math", "answer": "x+1", "options": None}
    cases = [  # (record, response, correct, extracted)
        (mc, think("The answer is \\boxed{A}."), True, "A"),
        (mc, think("\\boxed{B} at first, but then \\boxed{(A)}"), True, "(A)"),  # the last box counts
        (mc, think("So the answer is A."), True, "A"),  # a bare trailing option letter
        (mc, think("\\boxed{1/2}"), True, "1/2"),  # the option's text
        (mc, think("\\boxed{0.5}"), True, "0.5"),  # the option's text, as a number
        (mc, think("\\boxed{C}"), False, "C"),
        (mc_text_ref, think("\\boxed{B}"), True, "B"),  # a letter against a reference given as text
        (open_half, think("\\boxed{\\frac{1}{2}}"), True, "\\frac{1}{2}"),
        (open_half, think("\\boxed{3}"), False, "3"),
        (open_two, think("\\boxed{\\sqrt{4}}"), True, "\\sqrt{4}"),  # math-verify only
        (open_expr, think("\\boxed{1 + x}"), True, "1 + x"),  # math-verify only
        (open_half, "no box and no think", False, None),
    ]
    with R1V3Reward(acc_weight=1.0, format_weight=0.0, num_workers=1) as checker:
        rows = score_samples([c[0] for c in cases], [[c[1]] for c in cases], checker=checker)["rows"]
    for (rec, response, correct, extracted), row in zip(cases, rows):
        assert (row["correct"], row["extracted"]) == (correct, extracted), response
        assert row["well_formed"] == response.startswith("<think>")
    assert not is_correct(cases[9][1], "2") and not is_correct(cases[10][1], "x+1"), "rules alone miss these"


def test_pass_at_k_matches_chen_et_al():
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0 and pass_at_k(2, 2, 2) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 2)


def test_metrics_by_hand():
    responses = [
        [think("\\boxed{A}"), think("\\boxed{B}")],  # Math_1: 1 of 2
        ["\\boxed{7}", think("\\boxed{9}")],  # Math_2: 0 of 2, one malformed
        [think("I can't see the image, so \\boxed{C}"), think("\\boxed{C}")],  # Physics_3: 2 of 2, one claim
    ]
    out = score_samples(records(), responses, lengths=[10, 20, 30, 40, 50, 60],
                        truncated=[False, False, False, True, False, False])
    m = out["metrics"]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["accuracy_by_sample"] == pytest.approx([2 / 3, 1 / 3])
    assert m["accuracy_std"] == pytest.approx(math.sqrt(2 * (1 / 6) ** 2))  # sample std of the k sets
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    assert m["accuracy/Math"] == pytest.approx(1 / 4) and m["accuracy/Physics"] == 1.0
    assert m["format_rate"] == pytest.approx(5 / 6)
    assert m["response_tokens"] == pytest.approx(35.0) and m["truncation_rate"] == pytest.approx(1 / 6)
    assert m["blind_claim_rate"] == pytest.approx(1 / 6)
    assert m["accuracy_blind_claim"] == 1.0 and m["accuracy_no_claim"] == pytest.approx(2 / 5)
    assert [(r["id"], r["sample"]) for r in out["rows"]][:3] == [
        ("validation_Math_1", 0), ("validation_Math_1", 1), ("validation_Math_2", 0)]
    # No claim at all: that side of the split is absent, not NaN.
    clean = score_samples(records()[:1], [[think("\\boxed{A}")]])["metrics"]
    assert "accuracy_blind_claim" not in clean and clean["accuracy_std"] == 0.0 and clean["pass_at_k"] == 1.0


def test_bad_settings_are_one_line_errors(tiny_dirs):
    with pytest.raises(EvalConfigError, match=r"k must be >= 1, got 0"):
        EvalStage(str(tiny_dirs["internvl"]), k=0)
    with pytest.raises(EvalConfigError, match="top_p"):
        EvalStage(str(tiny_dirs["internvl"]), top_p=0.0)
    with pytest.raises(EvalConfigError):
        EvalMetrics(0)
    assert question_seed(0, ["a", "b"]) == question_seed(0, ["a", "b"]) != question_seed(1, ["a", "b"])


# -- the converter and the stage --------------------------------------------------------------------
def test_mmmu_shards_are_read_by_the_eval_data_path(mmmu_shards, tiny_dirs):
    stage = EvalStage(str(tiny_dirs["internvl"]), k=1)
    data = WebDataModule(val=str(mmmu_shards), val_batch_size=4, processor_path=str(tiny_dirs["internvl"]))
    data.collate_mode = stage.collate_mode
    data.setup("validate")
    batches = list(data.val_dataloader())
    meta = {key: [v for b in batches for v in b["meta"][key]] for key in ("id", "subject", "options", "prompt_text")}
    assert not any(b["skipped"] for b in batches)
    assert meta["id"] == [r["id"] for r in MMMU_RECORDS]
    assert meta["subject"] == ["Math", "Math", "Physics", "Physics", "Art_Theory", "Design"]
    assert meta["options"][0] == ["1/2", "3/4", "5", "6"] and meta["options"][1] is None
    assert [len(b) for batch in batches for b in batch["meta"]["pil_images"]] == [1, 1, 2, 1, 1, 1]
    assert meta["prompt_text"][0].count("A. 1/2") == 1  # options shown once


def evaluate(tiny_dirs, shards, out, **kwargs):
    stage = EvalStage(str(tiny_dirs["internvl"]), k=2, max_new_tokens=8, output_dir=str(out),
                      verify_workers=1, **kwargs)
    data = WebDataModule(val=str(shards), val_batch_size=4)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(out))
    logged = trainer.validate(stage, datamodule=data, verbose=False)[0]
    return stage, trainer, logged


def test_validate_writes_results_and_is_deterministic(mmmu_shards, tiny_dirs, tmp_path):
    _, _, logged = evaluate(tiny_dirs, mmmu_shards, tmp_path / "a", eval_seed=3)
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert result["counts"]["questions"] == 6 and result["counts"]["samples"] == 12
    assert result["counts"]["subjects"] == 4 and result["settings"]["k"] == 2
    for key in ("accuracy", "accuracy_std", "pass_at_k", "format_rate", "response_tokens", "truncation_rate",
                "blind_claim_rate"):
        assert key in result["metrics"] and logged[f"eval/{key}"] == pytest.approx(result["metrics"][key])
    assert set(result["subjects"]) == {"Math", "Physics", "Art_Theory", "Design"}
    physics = result["subjects"]["Physics"]
    assert (physics["questions"], physics["samples"]) == (2, 4)
    assert physics["accuracy"] == pytest.approx(logged["eval/accuracy/Physics"])
    assert len(result["accuracy_by_sample"]) == 2
    assert 0 < result["metrics"]["response_tokens"] <= 8

    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and [s["sample"] for s in samples[:4]] == [0, 1, 0, 1]
    assert set(samples[0]) == {"id", "subject", "sample", "response", "extracted", "reference", "correct",
                               "well_formed", "truncated", "blind_claim", "tokens"}
    assert [s["id"] for s in samples[::2]] == [r["id"] for r in MMMU_RECORDS]
    # The file's metrics are those of the samples it lists.
    again = EvalMetrics(2)
    again.update(samples)
    assert again.compute()["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    with open(tmp_path / "a" / "results.csv") as fh:
        table = {row["metric"]: row for row in csv.DictReader(fh)}
    assert float(table["accuracy"]["value"]) == pytest.approx(result["metrics"]["accuracy"])
    assert table["accuracy/Math"]["count"] == "4" and table["pass_at_k"]["count"] == "6"

    evaluate(tiny_dirs, mmmu_shards, tmp_path / "b", eval_seed=3)
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["metrics"] == result["metrics"] and again["subjects"] == result["subjects"]
    assert (tmp_path / "b" / "samples.jsonl").read_text() == (tmp_path / "a" / "samples.jsonl").read_text()
    evaluate(tiny_dirs, mmmu_shards, tmp_path / "c", eval_seed=4)
    assert (tmp_path / "c" / "samples.jsonl").read_text() != (tmp_path / "a" / "samples.jsonl").read_text()


def test_validate_from_a_training_checkpoint(mmmu_shards, tiny_dirs, tmp_path):
    """--ckpt_path: the trained weights load, and the training data position is ignored."""
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage

    sft = SFTStage(str(tiny_dirs["internvl"]), optimizer=OptimizerConfig(lr=0.1, warmup_ratio=0.0))
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(sft, datamodule=WebDataModule(train=str(mmmu_shards), batch_size=2))
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    stage = EvalStage(str(tiny_dirs["internvl"]), k=1, max_new_tokens=4, output_dir=str(tmp_path), verify_workers=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(stage, datamodule=WebDataModule(val=str(mmmu_shards), val_batch_size=4),
                     ckpt_path=tmp_path / "sft.ckpt", verbose=False)
    assert torch.equal(stage.model.lm_head.weight, sft.model.lm_head.weight)
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["ckpt_path"] == str(tmp_path / "sft.ckpt")


def test_fit_is_a_clear_error(mmmu_shards, tiny_dirs):
    stage = EvalStage(str(tiny_dirs["internvl"]), k=1, max_new_tokens=4)
    trainer = Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(EvalConfigError, match="nothing to train"):
        trainer.fit(stage, datamodule=WebDataModule(train=str(mmmu_shards), batch_size=2))


def test_cli_test_with_the_demo_config(mmmu_shards, tiny_dirs, tmp_path):
    from r1v3.cli import main

    rc = main(["test", "--config", str(REPO / "configs" / "eval" / "demo.yaml"),
               "--model.init_args.model_path", str(tiny_dirs["internvl"]), "--model.init_args.k", "1",
               "--model.init_args.max_new_tokens", "4", "--model.init_args.output_dir", str(tmp_path),
               "--data.init_args.val", "null", "--data.init_args.test", str(mmmu_shards),
               "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.enable_progress_bar", "false"])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["counts"]["samples"] == 6 and result["settings"]["split"] == "test"


# -- thinking modes ---------------------------------------------------------------------------------
def test_nowait_bans_the_trigger_tokens(tiny_dirs):
    stage = EvalStage(str(tiny_dirs["internvl"]), thinking="nowait", k=4, max_new_tokens=12)
    tok = stage.tokenizer
    banned = set(stage.banned)
    assert banned == set(banned_token_ids(tok))
    assert all(tok.decode([i]).strip() in ("Wait", "Alternatively", "Hmm") for i in banned)
    ids = tok("Wait, let me recount. Hmm", add_special_tokens=False).input_ids
    assert ids[0] in banned and ids[-1] in banned  # "Wait" and " Hmm" as the traces spell them
    stage.setup("validate")
    stage.configure_model()
    prompts = [Prompt(render_prompt(stage.processor, "<image>\nHow many shapes?", 1),
                      [Image.new("RGB", (32, 32), c)]) for c in ("red", "blue")]
    # Push the banned tokens far above the rest, so an unbanned engine would pick them nearly always.
    bias = torch.zeros(stage.model.lm_head.out_features)
    bias[sorted(banned)] = 30.0
    hook = stage.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=12)
        free = HFGenerateEngine(stage.model, stage.encoder, tok).generate(prompts, sampling, seed=0)
        assert torch.isin(free.completion_ids[free.completion_mask.bool()], torch.tensor(sorted(banned))).any()
        out = stage.engine.generate(prompts, sampling, seed=0)
    finally:
        hook.remove()
        stage.teardown("validate")
    generated = set(out.completion_ids[out.completion_mask.bool()].tolist())
    assert generated and not generated & banned
    assert not any(word in text for text in out.texts for word in ("Wait", "Hmm"))


def test_nothink_prefills_an_empty_think_block(tiny_dirs):
    stage = EvalStage(str(tiny_dirs["internvl"]), thinking="nothink", k=1)
    slow = render_prompt(stage.processor, "<image>\nHow many shapes?", 1)
    meta = {"prompt_text": [slow], "pil_images": [[Image.new("RGB", (32, 32), "red")]]}
    (prompt,) = stage.prompts(meta)
    assert prompt.text == slow + NOTHINK_PREFILL == apply_thinking_mode(slow, "nothink")
    assert prompt.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert apply_thinking_mode(slow, "slow") == apply_thinking_mode(slow, "nowait") == slow
    tokens = stage.tokenizer.convert_ids_to_tokens(stage.tokenizer(prompt.text).input_ids)
    assert tokens[-6:] == ["<think>", "Ċ", "Ċ", "</think>", "Ċ", "Ċ"]  # think markers stay whole tokens
    with pytest.raises(EvalConfigError):
        apply_thinking_mode(slow, "fast")
