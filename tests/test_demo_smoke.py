"""A seeded, short version of the embedded demo: SFT must read the image.

The real run must beat uniform guessing and a control trained on questions paired with other
samples' images (validation always shows the right image). About 1 minute on 2 cores.
"""

import json
import subprocess
import sys


def test_demo_smoke_reads_the_image(tmp_path):
    cmd = [sys.executable, "-m", "r1v3.cli", "demo", "--workdir", tmp_path / "demo", "--seed", "0",
           "--steps", "150", "--tasks", "colour,compare_bars", "--n-train", "1600", "--n-val", "128",
           "--trainer.val_check_interval=75", "--trainer.enable_progress_bar=false"]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=400)
    report = json.loads(out.stdout[out.stdout.index("{"):])
    real = report["sft"]["val/accuracy"]
    control = report["control_shuffled_images"]["val/accuracy"]
    assert real > report["chance"] + 0.15, report
    assert real > control + 0.15, report
    assert report["reads_the_image"] and out.returncode == 0
    assert report["sft"]["val/format_rate"] > 0.5
