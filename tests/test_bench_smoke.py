"""Benchmarks run in CI only as short smoke runs: they must still print their JSON figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sft_throughput_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "sft_throughput.py"), "--size", "tiny",
                          "--steps", "4", "--warmup", "1", "--batch-size", "4", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps_timed"] == 3
    assert result["tokens_per_s"] > 0 and result["step_time_median_s"] > 0
    assert result["peak_rss_mb"] > 100


def test_grpo_step_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "grpo_step.py"), "--size", "tiny", "--groups", "2",
                          "--steps", "2", "--warmup", "1", "--prompts", "2", "--lengths", "4", "8",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [(r["group_size"], r["max_new_tokens"]) for r in lines[:2]] == [(2, 4), (2, 8)]
    result = lines[1]
    assert result["steps_timed"] == 1 and result["response_len_mean_median"] == 8  # EOS suppressed
    for key in ("step_s_median", "rollout_s_median", "forward_s_median", "rollout_tokens_per_s_median"):
        assert result[key] > 0, key
    assert lines[2]["largest"] == "G2_len8" and lines[2]["largest_ms_per_token_over"]["G2_len4"] > 0



def test_update_flops_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "update_flops.py"), "--size", "tiny", "--precision",
                          "fp32", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "6", "--steps", "2",
                          "--profile", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["updates_timed"] == 2 and result["flops_spread"] == 0.0  # same work every update
    assert result["update_gflop"] > 0 and result["peak_bf16_gflops"] > 0
    # Against its own precision's peak the update stays below 1; against bf16's it need not, where
    # the CPU has no native bf16 (AVX-512-BF16/AMX) and bf16 matmuls run in a slow reference path.
    assert result["share_of_bf16_peak"] > 0 and 0 < result["share_of_own_precision_peak"] < 1
    assert "mm" in result["gflop_by_op"]
    top = result["profile_self_time_top"]
    assert 0 < len(top) <= 12 and all(row["self_s"] >= 0 for row in top) and sum(r["share"] for r in top) <= 1.001


def test_lora_bench_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "lora.py"), "--sizes", "tiny", "--steps", "2",
                          "--warmup", "1", "--prompts", "1", "--group-size", "2", "--new-tokens", "4",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    full, lora, ratios = [json.loads(line) for line in out.stdout.strip().splitlines()[-3:]]
    assert (full["mode"], lora["mode"]) == ("full", "lora") and full["params"] == lora["params"]
    assert lora["trainable_params"] < full["trainable_params"] / 3
    assert full["steps_timed"] == lora["steps_timed"] == 1 and lora["step_s_median"] > 0
    assert 0 < ratios["over_full"]["tiny/lora"]["sync_payload_mb"] < 0.5  # adapter + connector vs llm + connector


def test_long_run_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "long_run.py"), "--size", "tiny", "--rollout", "hf",
                          "--steps", "6", "--from-step", "2", "--plot", str(tmp_path / "memory.png"),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in result["series"]] == [1, 2, 3, 4, 5, 6]
    assert result["malloc_mmap_threshold"] == "1048576"  # the child runs with the stated allocator setting
    assert result["rss_anon"]["at_from_step_mb"] > 100 and abs(result["uss"]["growth"]) < 1
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_8bit_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "memory_8bit.py"), "--size", "tiny", "--steps", "2",
                          "--configs", "fp32", "fp32-in-backward", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    plain, fused = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert plain["breakdown_bytes_per_param"]["weights"] == 4.0
    assert plain["breakdown_bytes_per_param"]["gradients"] == 4.0
    assert fused["breakdown_bytes_per_param"]["gradients"] == 0.0  # freed inside the backward
    assert fused["breakdown_bytes_per_param"]["optimizer_state"] > 0

def test_plan_accuracy_smoke(tmp_path, monkeypatch):
    # One GRPO case on 1 process: the plan and the measured peak come from the same run config.
    # In-process (the run itself is still a child process): one interpreter start less.
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import plan_accuracy

    result = plan_accuracy.main(["--size", "tiny", "--steps", "1", "--cases", "grpo-1", "--new-tokens", "4",
                                 "--group", "2", "--prompts", "1", "--trace-words", "2", "--workdir", str(tmp_path)])
    (case,) = result["cases"]
    assert case["case"] == "grpo-1" and case["predicted_mb"] > 0 and case["measured_peak_mb"][0] > 0
    assert case["terms_gb"]["activations"] > 0 and result["prompt_tokens"] > 16  # image tokens included


def _compare_trl(tmp_path, side: str) -> dict:
    # One step, no warm-up: a smoke run checks the figures are produced, not their values.
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_trl.py"), "--families", "internvl",
                          "--sides", side, "--size", "tiny", "--steps", "1", "--warmup", "0", "--prompts", "2",
                          "--group-size", "2", "--max-new-tokens", "8", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["side"] == side and result["family"] == "internvl" and result["steps_timed"] == 1
    assert result["tokens_per_step"] == 2 * 2 * 8  # EOS is never sampled: equal work on every side
    assert result["step_s_median"] > 0 and result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 100
    for key in ("rollout_s", "reward_s", "forward_s", "backward_s", "other_s"):
        assert key in result["phases_median"], key
    assert result["checks"]["gradient_checkpointing"] is False
    assert {"reward_group_std", "prompts_digest", "tokens_per_s_over_trl"} <= result.keys()
    return result


def test_compare_trl_smoke_r1v3_hf(tmp_path):
    result = _compare_trl(tmp_path, "r1v3-hf")
    assert result["tokens_per_s_over_trl"] is None  # no TRL side in this run


def test_compare_trl_smoke_trl(tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark-only extra r1v3[bench]; bench/compare_trl.py "
                                      "says how to install it in its own venv")
    result = _compare_trl(tmp_path, "trl")
    assert result["checks"]["old_logprob_pass"] is False and result["tokens_per_s_over_trl"] == 1.0


def test_loss_variants_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "loss_variants.py"), "--smoke", "--seeds", "0",
                          "--variants", "grpo", "gspo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # Lightning prints its validate table to stdout too: the figures are the JSON lines
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    runs, summary = lines[:2], lines[-1]
    assert [r["variant"] for r in runs] == ["grpo", "gspo"] and all(r["steps"] == 4 for r in runs)
    assert [s["variant"] for s in summary["variants"]] == ["grpo", "gspo"]
    assert 0.0 <= summary["variants"][0]["accuracy_mean"] <= 1.0 and summary["mini_batches"] == 2
    assert "| gspo |" in out.stderr  # the docs table


def test_logits_memory_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "logits_memory.py"), "--size", "tiny", "--vocabs", "2048",
                          "--chunks", "0", "32", "--max-new-tokens", "8", "--steps", "2", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    *settings, summary = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [(s["vocab"], s["chunk"], s["updates"]) for s in settings] == [(2050, 0, 2), (2050, 32, 2)]
    assert all(s["activation_mb_median"] > 0 and s["update_s_median"] > 0 for s in settings)
    assert summary["activation_ratio_chunk32"] == 1.0 and summary["time_ratio_v2048_chunk32_vs_whole"] > 0


@pytest.mark.parametrize("side", ["r1v3", "trl"])
def test_compare_trl_sft_smoke(tmp_path, side):
    if side == "trl":
        pytest.importorskip("trl", reason="TRL is the benchmark-only extra r1v3[bench]; .ci/setup_bench.sh builds its venv")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare_trl_sft.py"), "--size", "tiny", "--steps", "3",
                          "--warmup", "1", "--profile", "--run-side", side, "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["side"] == side and result["steps_timed"] == 2
    assert result["tokens_per_s"] > 0 and result["tokens_per_step_median"] > 100 and result["peak_rss_mb"] > 100
    assert result["profile_self_time_top"][0]["share"] > 0  # the profiled step comes after the 2 timed ones
    if side == "r1v3":
        assert result["checks"]["padding_free"]


def test_padding_free_smoke(tmp_path):
    from r1v3.tools.tiny import build_tiny

    rollouts = tmp_path / "rollouts.jsonl"  # the shape of a demo run's rollout log
    rollouts.write_text("\n".join(json.dumps({"completion": "<think>" + "a b " * k + "</think> 3", "finish": "stop"})
                                  for k in (1, 4, 9)))
    build_tiny("internvl", tmp_path / "model")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "padding_free.py"), "--size", "tiny", "--repeats", "1",
                          "--precisions", "fp32", "--prompts", "2", "--group-size", "3", "--max-new-tokens", "16",
                          "--sft-batch", "4", "--rollouts", str(rollouts), "--tokenizer", str(tmp_path / "model"),
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [line["workload"] for line in lines] == ["grpo_update", "sft_step"]
    assert all(line["packed_s"] > 0 and line["padded_s"] > 0 and 0 < line["padding_share"] < 1 for line in lines)
    assert lines[0]["lengths"] == "demo rollouts" and lines[0]["real_tokens"] < 6 * 16
