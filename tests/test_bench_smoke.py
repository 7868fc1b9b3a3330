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
