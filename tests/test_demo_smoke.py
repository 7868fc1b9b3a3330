"""A seeded, short version of the embedded demo (about 1½ minutes on 2 cores).

SFT must read the image: it beats uniform guessing and a control trained on questions paired with
other samples' images (validation always shows the right image). GRPO from that SFT export must
then raise the accuracy reward on the val split (sampled at temperature 1.0, the paper's protocol).
The connector stage must change the connector alone, and the run must end in a report.
"""

import json
import subprocess
import sys


def test_demo_smoke_sft_reads_the_image_and_grpo_raises_accuracy(tmp_path):
    cmd = [sys.executable, "-m", "r1v3.cli", "demo", "--workdir", tmp_path / "demo", "--seed", "0",
           "--steps", "150", "--tasks", "colour,compare_bars", "--n-train", "1600", "--n-val", "128",
           "--trainer.val_check_interval=75", "--trainer.enable_progress_bar=false",
           "--grpo-steps", "40", "--grpo-arg=--trainer.val_check_interval=40",
           "--grpo-arg=--trainer.enable_progress_bar=false", "--connector-steps", "20",
           "--connector-arg=--trainer.val_check_interval=10", "--connector-arg=--trainer.enable_progress_bar=false"]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1500)  # ~2½ min alone; generous for a loaded machine
    assert "{" in out.stdout, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    real = report["sft"]["val/accuracy"]
    control = report["control_shuffled_images"]["val/accuracy"]
    assert real > report["chance"] + 0.15, report
    assert real > control + 0.15, report
    assert report["sft"]["val/format_rate"] > 0.5
    assert report["grpo"]["steps"] == 40
    assert report["grpo"]["val/accuracy"] > report["grpo_start"]["val/accuracy"], report
    assert report["reads_the_image"] and out.returncode == 0
    assert report["connector"]["steps"] == 20 and report["connector"]["changed_groups"] == ["connector"]
    assert "val/critical_entropy" in report["grpo"], "the demo's traces carry trigger words"
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "Checkpoints ranked by critical-token entropy" in md and "grpo/checkpoints/" in md
    assert (tmp_path / "demo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
