"""FSDP2 sharded training on CPU: 2 processes over gloo, each run a subprocess (tests/fsdp_driver.py),
which Lightning's launcher forks into its two ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fsdp_driver.py")
TIMEOUT = 300  # seconds per launched run; each takes 10-20 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    # Two ranks share the machine's 2 cores: one thread each, or they oversubscribe.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), TOKENIZERS_PARALLELISM="false")


def run_subprocess(cmd: list[str], cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, so that a hang takes every rank it started down with it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(),
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[2:]} timed out after {TIMEOUT} s (a collective hang?)\n{err[-3000:]}")
    finally:
        try:  # a rank left behind by a crash of the other one
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(out: Path, **spec) -> list[dict]:
    """Fit with ``spec`` (see fsdp_driver.py); the per-rank records, rank order."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"devices": 2, "strategy": "fsdp2", "out": str(out), **spec}
    (out / "spec.json").write_text(json.dumps(spec))
    done = run_subprocess([sys.executable, str(DRIVER), str(out / "spec.json")])
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(spec["devices"])]


def write_samples(samples, out: Path) -> Path:
    from r1v3.data_modules.shards import write_shards

    write_shards(samples, str(out / "train-%06d.tar"), maxcount=1000)
    return out


@pytest.fixture(scope="module")
def equal_length_dir(tmp_path_factory) -> Path:
    """Colour questions (one fixed text) with distinct images and one fixed answer: every sample
    has the same prompt and label length, so a mean over 2 + 2 samples is the mean over 4."""
    from r1v3.data_modules.synthetic import generate

    samples = [dict(s, id=f"eq{i:03d}", trace="I see one shape.", answer="A")
               for i, s in enumerate(generate(32, ("colour",), seed=1))]
    return write_samples(samples, tmp_path_factory.mktemp("equal"))


@pytest.fixture(scope="module")
def sharded_sft(tmp_path_factory, tiny_dirs, equal_length_dir):
    """4 SFT steps of tiny InternVL sharded over 2 processes × batch 2, validating (loss and greedy
    generation) at steps 2 and 4, with a gathered state dict and an HF export."""
    out = tmp_path_factory.mktemp("sharded_sft")
    ranks = launch(out, stage="sft", model=str(tiny_dirs["internvl"]), train=str(equal_length_dir),
                   batch_size=2, max_steps=4, lr=2e-3, gather=True, export_dir=str(out / "hf"),
                   val=str(equal_length_dir), val_every=2)
    return out, ranks


def combined_losses(ranks: list[dict]) -> list[float]:
    """Per-step loss over the global batch: rank losses weighted by their label-token counts."""
    out = []
    for steps in zip(*(r["steps"] for r in ranks)):
        tokens = sum(s["tokens"] for s in steps)
        out.append(sum(s["loss"] * s["tokens"] for s in steps) / tokens)
    return out


@pytest.mark.slow
def test_sharded_sft_matches_single_process(tmp_path, tiny_dirs, equal_length_dir, sharded_sft):
    _, ranks = sharded_sft
    single = launch(tmp_path / "single", devices=1, strategy="none", stage="sft", model=str(tiny_dirs["internvl"]),
                    train=str(equal_length_dir), batch_size=4, max_steps=4, lr=2e-3)[0]

    for rank in ranks:  # parameters are sharded: DTensors, each rank holding about half
        assert rank["sharded"] and rank["param_types"] == ["DTensor"] and rank["global_step"] == 4
        assert 0.45 * rank["full_numel"] < rank["local_numel"] < 0.55 * rank["full_numel"]
    assert single["param_types"] == ["Parameter"]
    assert all({"val/loss", "val/accuracy"} <= r["val"].keys() for r in ranks)  # generation ran synced
    # The data module deals sample i of the epoch plan to rank i mod 2, so 2 ranks × batch 2 see
    # exactly the samples of 1 process × batch 4, step by step ...
    for step, r0, r1 in zip(single["steps"], *(r["steps"] for r in ranks)):
        assert sorted(step["ids"]) == sorted(r0["ids"] + r1["ids"])
        assert r0["tokens"] == r1["tokens"] == step["tokens"] / 2
    # ... and with equal token counts per rank, FSDP's average of the two ranks' mean-loss
    # gradients is the single process's mean-loss gradient. Tolerance, fixed before the first run:
    # 1e-4 absolute on losses near 6. Step 1 differs only by float32 summation order in matmuls
    # over 2 vs 4 rows (~1e-7 relative, ~1e-6 absolute); later steps add the gradient-reduction
    # order, which AdamW's normalisation can amplify only for gradients at rounding-noise level,
    # whose parameters barely move the loss. Each step moves the loss by > 0.1, so an update from
    # one rank's gradient alone would miss by orders of magnitude more. (Observed: < 1e-6.)
    sharded, reference = combined_losses(ranks), [s["loss"] for s in single["steps"]]
    assert sharded == pytest.approx(reference, abs=1e-4)
    assert reference[0] - reference[-1] > 0.5


@pytest.mark.slow
def test_sharded_sft_gradient_is_the_mean_over_all_target_tokens(tmp_path, tiny_dirs, uneven_dir):
    # Rows of ~10x different target lengths: FSDP's average of two ranks' own token means would
    # weigh the short rows' tokens more. The step's gradient must be the mean over both ranks'
    # targets, which is the single process's gradient on the same 4 rows; and under accumulation
    # too (2 ranks x 2 micro-batches of 1 row against 1 process x 4 rows).
    common = dict(stage="sft", model=str(tiny_dirs["internvl"]), train=str(uneven_dir), max_steps=1,
                  record_grads=True)
    single = launch(tmp_path / "single", devices=1, strategy="none", batch_size=4, **common)[0]
    reference = torch.load(tmp_path / "single" / "grads.pt")
    for name, batch, accumulate in (("sharded", 2, 1), ("accumulated", 1, 2)):
        ranks = launch(tmp_path / name, batch_size=batch, accumulate=accumulate, **common)
        per_rank = [sum(s["tokens"] for s in r["steps"]) for r in ranks]
        assert sum(per_rank) == single["steps"][0]["tokens"] and max(per_rank) > 1.5 * min(per_rank)
        grad = torch.load(tmp_path / name / "grads.pt")
        # fp32: only the summation and reduction order differ (observed ~1e-7)
        assert float((grad - reference).norm() / reference.norm()) < 1e-5, name


@pytest.mark.slow
def test_export_from_sharded_run_loads_in_transformers(tiny_dirs, sharded_sft):
    from transformers import AutoModelForImageTextToText

    out, _ = sharded_sft
    gathered = torch.load(out / "gathered.pt")
    model = AutoModelForImageTextToText.from_pretrained(out / "hf")
    exported = model.state_dict()
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_dirs["internvl"]).state_dict()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "the export holds trained weights"
    assert (out / "hf" / "processor_config.json").exists()
    assert stored_keys(out / "hf") == stored_keys(tiny_dirs["internvl"]), "the base checkpoint's tensor names"


def stored_keys(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_directory(tmp_path, tiny_dirs, equal_length_dir, sharded_sft):
    common = dict(stage="sft", model=str(tiny_dirs["internvl"]), train=str(equal_length_dir), batch_size=2,
                  lr=2e-3, ckpt_dir=str(tmp_path / "ckpt"))
    first = launch(tmp_path / "first", max_steps=2, **common)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2
    # A save that crashed mid-write leaves only its temporary sibling; `last` stays whole.
    partial = tmp_path / "ckpt" / ".last.ckpt.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    resumed = launch(tmp_path / "resumed", max_steps=4, ckpt_path=str(last), **common)

    assert [r["global_step"] for r in first] == [2, 2] and [r["global_step"] for r in resumed] == [4, 4]
    # The resumed steps 3-4 are those of the uninterrupted run: weights, AdamW moments, schedule
    # and data position all came back (same operations in the same order: equal to float32).
    _, uninterrupted = sharded_sft
    for rank in range(2):
        assert [s["loss"] for s in first[rank]["steps"]] == pytest.approx(
            [s["loss"] for s in uninterrupted[rank]["steps"][:2]], abs=1e-6)
        assert [s["loss"] for s in resumed[rank]["steps"]] == pytest.approx(
            [s["loss"] for s in uninterrupted[rank]["steps"][2:]], abs=1e-6)
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]


@pytest.fixture(scope="module")
def short_epoch_dir(tmp_path_factory) -> Path:
    """16 equal-length samples: an epoch short enough to run twice in a test."""
    from r1v3.data_modules.synthetic import generate

    samples = [dict(s, id=f"se{i:03d}", trace="I see one shape.", answer="A")
               for i, s in enumerate(generate(16, ("colour",), seed=1))]
    return write_samples(samples, tmp_path_factory.mktemp("short_epoch"))


@pytest.mark.slow
@pytest.mark.parametrize("before, after, steps_before", [(2, 1, 2), (1, 2, 4)])
def test_resume_on_another_world_size(tmp_path, tiny_dirs, short_epoch_dir, before, after, steps_before):
    """Stop a sharded SFT run and resume it on another number of processes: the checkpoint is
    resharded on load and the rest of the epoch's 16 samples is re-split over the new ranks, so
    over both runs every sample is seen exactly once."""
    common = dict(stage="sft", model=str(tiny_dirs["internvl"]), train=str(short_epoch_dir), batch_size=2,
                  lr=2e-3, ckpt_dir=str(tmp_path / "ckpt"))
    first = launch(tmp_path / "first", devices=before, max_steps=steps_before, **common)
    remaining = (16 - steps_before * 2 * before) // (2 * after)
    # 2 -> 1 also runs the whole next epoch: its length must be a full epoch's again, not the
    # resumed epoch's (the done + re-split batches Lightning was told).
    next_epoch = 16 // (2 * after) if after < before else 0
    resumed = launch(tmp_path / "resumed", devices=after, max_steps=steps_before + remaining + next_epoch,
                     ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **common)
    assert all(r["global_step"] == steps_before + remaining + next_epoch for r in resumed)
    seen = [i for r in first for step in r["steps"] for i in step["ids"]]
    seen += [i for r in resumed for step in r["steps"][:remaining] for i in step["ids"]]
    assert len(seen) == len(set(seen)) == 16
    epoch_1 = [i for r in resumed for step in r["steps"][remaining:] for i in step["ids"]]
    assert len(epoch_1) == len(set(epoch_1)) == (16 if next_epoch else 0), "the next epoch is whole again"
    assert all(step["loss"] > 0 for r in resumed for step in r["steps"])


@pytest.mark.slow
def test_connector_only_under_sharding(tmp_path, tiny_dirs, synth_dir):
    from transformers import AutoModelForImageTextToText

    # Qwen2.5-VL's connector (the merger) sits inside its vision tower: the hardest split. The
    # model is built before fit, so the strategy shards an existing model.
    ranks = launch(tmp_path, stage="sft", model=str(tiny_dirs["qwen2_5_vl"]), train=str(synth_dir / "train"),
                   batch_size=2, max_steps=2, lr=1e-2, trainable=["connector"], gather=True, preconfigure=True)
    assert all(r["param_types"] == ["DTensor"] for r in ranks)
    trained = torch.load(tmp_path / "gathered.pt")
    initial = AutoModelForImageTextToText.from_pretrained(tiny_dirs["qwen2_5_vl"]).state_dict()
    changed = {k for k in initial if not torch.equal(trained[k], initial[k])}
    assert changed and all(k.startswith("model.visual.merger.") for k in changed)
    assert all(torch.equal(trained[k], initial[k]) for k in initial if not k.startswith("model.visual.merger."))


@pytest.mark.slow
def test_moe_layers_are_their_own_units_and_train_sharded(tmp_path, tiny_dirs, synth_dir):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_dirs["qwen3_vl_moe"]
    ranks = launch(tmp_path, stage="sft", model=str(model_dir), train=str(synth_dir / "train"), batch_size=2,
                   max_steps=2, lr=1e-2, router_aux_loss_coef=0.01, gather=True, export_dir=str(tmp_path / "hf"))
    assert all("FSDPQwen3VLMoeTextSparseMoeBlock" in r["units"] and "FSDPQwen3VLMoeTextDecoderLayer" in r["units"]
               for r in ranks)
    assert all(step["router_aux_loss"] > 0 for r in ranks for step in r["steps"])
    trained = torch.load(tmp_path / "gathered.pt")
    initial = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    for key in ("model.language_model.layers.0.mlp.gate.weight", "model.language_model.layers.0.mlp.experts.gate_up_proj"):
        assert not torch.equal(trained[key], initial[key]), key
    # The sharded export keeps the released expert layout and loads back to the trained weights.
    files = list((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) == 1, files
    with safe_open(str(files[0]), "pt") as f:
        released = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    experts, out, hidden = trained["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape
    assert released == [experts, hidden, out]
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_grpo_sharded_ranks_update_in_step(tmp_path, tiny_dirs, synth_dir):
    # fsdp_driver.length_reward gives rank 1 only flat groups: dynamic sampling drops all its rows,
    # so it must pad every micro-batch pass of rank 0's updates. kl_coef loads the reference,
    # sharded, whose passes pad the same way; 2 mini-batches make the old log-probs pass and 2 updates per rollout batch.
    # Activation checkpointing is on: the shared prompt pass runs checkpointed as well as sharded.
    ranks = launch(tmp_path, stage="grpo", model=str(tiny_dirs["internvl"]), train=str(synth_dir / "train"),
                   batch_size=2, max_steps=4, lr=1e-3, strategy_args={"activation_checkpointing": True},
                   grpo={"mini_batches": 2, "dynamic_sampling": True, "micro_batch_tokens": 64, "kl_coef": 0.05},
                   check_reference=True, check_prefix=True)
    assert [r["global_step"] for r in ranks] == [4, 4]  # 2 rollout batches × 2 updates, on both ranks
    # The reference is sharded like the policy, and gives an unsharded copy's log-probs.
    assert all(r["reference_types"] == ["DTensor"] and r["reference_gap"] < 1e-4 for r in ranks), ranks
    # The shared prompt pass runs sharded and checkpointed: log-probs and gathered gradients equal
    # the per-row pass within tests/test_prefix.py's fp32 bounds.
    for r in ranks:
        assert r["prefix"]["shares"] and r["prefix"]["checkpointed"], r["prefix"]
        assert r["prefix"]["logp_gap"] <= 1e-5 * r["prefix"]["logp_scale"] and r["prefix"]["grad_rel"] <= 1e-4, r
        assert r["prefix"]["loss_gap"] <= 1e-5 * max(r["prefix"]["loss_scale"], 1e-3), r["prefix"]
    assert all(r["param_types"] == ["DTensor"] for r in ranks)
    assert [len(r["steps"]) for r in ranks] == [2, 2]
    assert all(s["padded_micro_batches"] == 0 for s in ranks[0]["steps"])
    assert all(s["padded_micro_batches"] > 0 for s in ranks[1]["steps"])


def test_lora_grpo_sharded(tmp_path, tiny_dirs, synth_dir):
    # LoRA under FSDP2 on 2 processes, checkpointed, loaded shard by shard: the reference is the
    # sharded policy with adapters off, the shared prompt pass equals the per-row pass, and the
    # export (gathered tensor by tensor) is a merged checkpoint plus an adapter peft loads.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_dirs["internvl"]
    ranks = launch(tmp_path, stage="grpo", model=str(model_dir), train=str(synth_dir / "train"), batch_size=2,
                   max_steps=2, lr=1e-2, trainable=["connector"], lora={"groups": ["llm"], "r": 4},
                   strategy_args={"activation_checkpointing": True}, export_dir=str(tmp_path / "export"),
                   grpo={"kl_coef": 0.05, "micro_batch_tokens": 64}, check_reference=True, check_prefix=True)
    assert [r["global_step"] for r in ranks] == [2, 2]
    # read shard by shard, the adapters start as peft starts them: A uniform in ±1/sqrt(fan_in), one
    # matrix whose rows the ranks split (not the same rows drawn on each rank)
    assert all(r["adapter_rows_distinct"] and r["adapter_bound"] <= 1.0 for r in ranks), ranks
    for r in ranks:
        assert r["reference_is_policy"] and r["reference_types"] == ["DTensor"] and r["reference_gap"] < 1e-4, r
        assert r["prefix"]["shares"] and r["prefix"]["checkpointed"], r["prefix"]
        assert r["prefix"]["logp_gap"] <= 1e-5 * r["prefix"]["logp_scale"] and r["prefix"]["grad_rel"] <= 1e-4, r
    assert stored_keys(tmp_path / "export") == stored_keys(model_dir), "the base checkpoint's tensor names"
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(10, 200, (1, 12))
    with torch.no_grad():
        untrained = AutoModelForImageTextToText.from_pretrained(model_dir).eval()(input_ids=ids).logits
        base = AutoModelForImageTextToText.from_pretrained(model_dir)
        base.load_state_dict({k: v for k, v in merged.state_dict().items() if "multi_modal_projector" in k},
                             strict=False)
        want = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert (got - untrained).abs().max() > 1e-4, "the adapters were trained"


@pytest.fixture(scope="module")
def image_less_rank_dir(tmp_path_factory) -> Path:
    """8 colour samples where the 4 that the epoch plan deals to rank 1 (of 2) have no image."""
    from r1v3.data_modules.synthetic import generate
    from r1v3.data_modules.webdata import ShardStream, load_sources

    out = tmp_path_factory.mktemp("image_less")
    samples = [dict(s, id=f"m{i:03d}") for i, s in enumerate(generate(8, ("colour",), seed=2))]
    write_samples(samples, out)
    # The plan depends on sample counts only, so rewriting the same number of samples keeps it.
    plan = ShardStream(load_sources(str(out)), batch_size=2, seed=0, world_size=2, rank=1).rank_plan(0)
    for _, _, member in plan:
        samples[member] = dict(samples[member], question=samples[member]["question"].replace("<image>\n", ""),
                               images=[])
    return write_samples(samples, out)


@pytest.mark.slow
def test_rank_without_images_runs_the_vision_tower(tmp_path, tiny_dirs, image_less_rank_dir):
    # Without the blank-image pass, rank 1 skips the vision blocks' all-gathers and the run
    # crashes or hangs (checked by hand). GRPO covers the generation prefill and the update.
    ranks = launch(tmp_path, stage="grpo", model=str(tiny_dirs["qwen2_5_vl"]), train=str(image_less_rank_dir),
                   batch_size=2, max_steps=2, lr=1e-3)
    assert [r["global_step"] for r in ranks] == [2, 2]


@pytest.mark.slow
def test_fsdp1_on_cpu_is_a_one_line_error(tmp_path, tiny_dirs, synth_dir):
    config = tmp_path / "sft.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, logger: false, enable_checkpointing: false}}
model:
  class_path: r1v3.stages.sft.SFTStage
  init_args: {{model_path: {tiny_dirs["internvl"]}, val_generate: false}}
data:
  class_path: r1v3.data_modules.webdata.WebDataModule
  init_args: {{train: {synth_dir / "train"}, batch_size: 2}}
""")
    done = run_subprocess([sys.executable, "-m", "r1v3.cli", "fit", "--config", str(config),
                           "--config", str(REPO / "configs" / "strategies" / "fsdp1_gpu.yaml")], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("r1v3: error:")]
    assert len(errors) == 1 and "FSDP1" in errors[0] and "fsdp2.yaml" in errors[0]
    assert "Traceback" not in done.stderr


def test_swap_into_place_replaces_a_directory_whole(tmp_path):
    from r1v3.fsdp import swap_into_place

    dest, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    new.mkdir()
    (new / "shard").write_text("step 1")
    swap_into_place(new, dest)  # first save: a plain rename
    assert (dest / "shard").read_text() == "step 1" and not new.exists()
    new.mkdir()
    (new / "shard").write_text("step 2")
    swap_into_place(new, dest)  # over an existing checkpoint
    assert (dest / "shard").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_blocks_come_from_no_split_modules(tiny_dirs):
    from transformers import AutoModelForImageTextToText

    from r1v3.backbone import BackboneError
    from r1v3.fsdp import block_classes

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs["qwen2_5_vl"])
    assert {c.__name__ for c in block_classes(model)} == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    with pytest.raises(BackboneError, match="_no_split_modules"):
        block_classes(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_sharded_load_holds_a_shard_and_one_slice(tmp_path, capsys):
    """2 processes load the 0.57B medium preset (float32 file, bfloat16 weights): each rank's
    anonymous memory peaks at its shard plus the largest slice it read (plus allocator slack), where
    loading the whole checkpoint first (the path before) peaks at a full bf16 copy plus the shard."""
    from r1v3.tools.tiny import build_tiny

    model_dir = build_tiny("internvl", tmp_path / "medium", size="medium")
    done = run_subprocess([sys.executable, str(REPO / "bench" / "sharded_load.py"), "--model-dir", str(model_dir),
                           "--dtype", "bfloat16"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for sharded, full in zip(result["sharded"], result["full"]):
        assert sharded["full_model_mb"] > 1000  # 0.57B parameters in bf16
        bound = sharded["shard_mb"] + sharded["largest_slice_mb"]
        assert sharded["peak_above_baseline_mb"] <= 1.1 * bound, sharded
        assert full["peak_above_baseline_mb"] >= full["full_model_mb"], full
        # The consolidated export stages this rank's shard once more, never the whole model
        # (rank 0's file-by-file consolidation included).
        assert sharded["export_peak_above_loaded_mb"] <= 1.1 * sharded["shard_mb"] + 16, sharded
    assert result["sharded"][0]["export_files_mb"] == [pytest.approx(result["sharded"][0]["full_model_mb"], rel=0.01)]
    with capsys.disabled():
        print("\nsharded load, per rank: peak", [round(r["peak_above_baseline_mb"]) for r in result["sharded"]],
              "MB (shard", round(result["sharded"][0]["shard_mb"]), "MB + slice",
              round(result["sharded"][0]["largest_slice_mb"]), "MB); whole-checkpoint load:",
              [round(r["peak_above_baseline_mb"]) for r in result["full"]], "MB; export above the loaded model:",
              [round(r["export_peak_above_loaded_mb"]) for r in result["sharded"]], "MB")


def test_a_rollback_restores_a_sharded_checkpoint_on_every_rank(tmp_path, tiny_dirs, synth_dir):
    # FSDP2 on 2 processes, healthy (sharded, DCP) checkpoints every 2 steps, an alarm at step 3:
    # both ranks go back to step 2's weights and optimizer state, and halve the learning rate
    ranks = launch(tmp_path, stage="grpo", model=str(tiny_dirs["internvl"]), train=str(synth_dir / "train"),
                   batch_size=2, max_steps=4, lr=1e-2, trainable=["connector"], ckpt_dir=str(tmp_path / "ckpt"),
                   rollback={"at": 3, "every": 2})
    for r in ranks:
        assert [(b["step"], b["restored_step"], b["lr"]) for b in r["rollbacks"]] == [(3, 2, [5e-3])]
        prints = {int(k): v for k, v in r["fingerprints"].items()}
        assert prints[3] == prints[2] != prints[4], "step 3 ended on step 2's weights; step 4 trained on"
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert (tmp_path / "ckpt" / "healthy-step=2.ckpt").is_dir(), "a sharded checkpoint is a directory"
