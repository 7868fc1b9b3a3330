"""Benchmarks run in CI only as short smoke runs: they must still print their JSON figures."""

import json
import subprocess
import sys
from pathlib import Path

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
                          "--steps", "2", "--warmup", "1", "--prompts", "2", "--max-new-tokens", "8",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["group_size"] == 2 and result["steps_timed"] == 1
    for key in ("step_s_median", "rollout_s_median", "forward_s_median", "rollout_tokens_per_s_median"):
        assert result[key] > 0, key
