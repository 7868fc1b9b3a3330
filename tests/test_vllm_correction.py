"""Rollout correction against the real vLLM engine (the vLLM tier): ``auto`` turns TIS on for a
bf16 engine under a float32 policy and off where both sides compute in float32, and the mismatch
metrics measure the gap either way."""

import math

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("need_vllm")]


def length_reward(items):
    return [{"reward": min(len(it["response"]) / 30.0, 1.0), "accuracy": 0.0, "format": 0.0} for it in items]


def fit_on_vllm(model_dir, data_dir, engine_dtype, **kwargs):
    from lightning.pytorch import Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(model_dir), rollout="vllm", vllm=VLLMConfig(max_model_len=512, dtype=engine_dtype),
                      sampling=SamplingConfig(n=4, max_new_tokens=12), reward_fn="test_vllm_correction.length_reward",
                      rollout_log_every=0, optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"),
                      **kwargs)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(data_dir / "train"), batch_size=2))
    return stage, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_bf16_engine_under_a_float32_policy_gets_tis_and_its_gap_is_logged(tiny_dirs, synth_dir):
    stage, metrics = fit_on_vllm(tiny_dirs["internvl"], synth_dir, "bfloat16", mini_batches=2)
    assert stage.loss_spec.correction_mode == "tis"
    for key in ("mismatch_kl", "is_weight_mean", "is_weight_max", "tis_clipped_frac", "mis_masked_frac",
                "mismatch_kl_image", "is_weight_max_image"):
        assert f"train/{key}" in metrics, key
    # bf16 rounding moves the engine's log-probs: measurably, but far from a broken engine
    assert 1e-7 < metrics["train/mismatch_kl"] < 0.05
    assert metrics["train/is_weight_max"] != 1.0
    assert math.isfinite(metrics["train/loss"])


def test_float32_on_both_sides_needs_no_correction_and_tis_mis_runs_off_policy(tiny_dirs, synth_dir):
    stage, metrics = fit_on_vllm(tiny_dirs["internvl"], synth_dir, "float32")
    assert stage.loss_spec.correction_mode == "off"
    assert metrics["train/mismatch_kl"] < 1e-6  # the same numbers on both sides
    stage, metrics = fit_on_vllm(tiny_dirs["internvl"], synth_dir, "float32", num_iterations=2,
                                 correction={"mode": "tis+mis"})
    assert stage.loss_spec.correction_mode == "tis+mis"
    assert metrics["train/tis_clipped_frac"] == 0.0 and metrics["train/mis_masked_frac"] == 0.0
    assert metrics["train/is_weight_max"] < 1.001 and math.isfinite(metrics["train/loss"])


def test_rollout_mismatch_benchmark_smoke(tmp_path, capsys):
    from conftest import run_bench

    result = run_bench("rollout_mismatch", ["--engines", "hf,vllm-bfloat16", "--prompts", "2", "--group-size", "2",
                                            "--max-new-tokens", "8", "--workdir", str(tmp_path)], capsys)
    figures = result["figures"]
    assert set(figures) == {f"{e}/trainer_{t}" for e in ("hf", "vllm-bfloat16") for t in ("fp32", "bf16-mixed")}
    assert figures["hf/trainer_fp32"]["mismatch_kl"] < 1e-6
    assert figures["vllm-bfloat16/trainer_fp32"]["mismatch_kl"] > figures["hf/trainer_fp32"]["mismatch_kl"]
    assert {"mismatch_kl_image", "mismatch_kl_text"} <= set(figures["hf/trainer_fp32"])
