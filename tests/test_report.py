"""`r1v3 report`: curves PNG and markdown summary from CSVLogger metrics and checkpoint sidecars."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from r1v3.tools.report import build_report, report_main

SFT_COLUMNS = ["epoch", "step", "train/loss", "val/accuracy", "val/loss"]
GRPO_COLUMNS = ["epoch", "step", "alarm/entropy_surge", "kl/k3", "train/entropy", "train/grad_norm", "train/lr",
                "train/reward_mean", "val/accuracy", "val/critical_entropy"]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """CSVLogger layout: one header, and only the metrics logged at a row's step filled in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_ckpt(path: Path, step: int, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    sidecar = {"checkpoint": path.name, "step": step, "epoch": 0, "monitor": "val/critical_entropy",
               "metrics": metrics}
    path.with_name(path.name + ".json").write_text(json.dumps(sidecar))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "demo"
    sft = [{"epoch": 0, "step": s, "train/loss": 3.0 / (1 + s)} for s in range(0, 40, 5)]
    sft += [{"epoch": 0, "step": 19, "val/accuracy": 0.40, "val/loss": 0.90},
            {"epoch": 0, "step": 39, "val/accuracy": 0.35, "val/loss": 0.70}]
    # A stale, lower version must be ignored in favour of version_1.
    write_csv(run / "sft/logs/version_0/metrics.csv", SFT_COLUMNS, [{"epoch": 0, "step": 1, "val/accuracy": 0.99}])
    write_csv(run / "sft/logs/version_1/metrics.csv", SFT_COLUMNS, sft)
    grpo = [{"epoch": 0, "step": s, "train/reward_mean": 0.3 + 0.01 * s, "train/entropy": 1.0 - 0.01 * s,
             "train/grad_norm": 0.5, "train/lr": 2e-4, "kl/k3": 0.001 * s} for s in range(1, 21)]
    grpo[3]["train/entropy"] = "nan"  # non-finite and non-numeric cells are skipped
    grpo[4]["train/grad_norm"] = "oops"
    grpo += [{"epoch": 0, "step": 10, "val/accuracy": 0.55, "val/critical_entropy": 0.41},
             {"epoch": 0, "step": 20, "val/accuracy": 0.50, "val/critical_entropy": 0.62},
             {"epoch": 0, "step": 12, "alarm/entropy_surge": 1.0}]
    write_csv(run / "grpo/logs/version_0/metrics.csv", GRPO_COLUMNS, grpo)
    (run / "model").mkdir()  # stage dirs without metrics are fine
    write_ckpt(run / "grpo/checkpoints/step=10.ckpt", 10, {"val/critical_entropy": 0.41, "val/accuracy": 0.55})
    write_ckpt(run / "grpo/checkpoints/step=20.ckpt", 20, {"val/critical_entropy": 0.62, "val/accuracy": 0.50})
    write_ckpt(run / "sft/checkpoints/last.ckpt", 39, {"val/accuracy": 0.35})
    # A sidecar whose checkpoint was pruned is not listed.
    write_ckpt(run / "grpo/checkpoints/step=5.ckpt", 5, {"val/critical_entropy": 0.9})
    (run / "grpo/checkpoints/step=5.ckpt").unlink()
    return run


def test_report_png_and_markdown(run_dir, capsys):
    assert report_main([str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    png, md = run_dir / "report.png", run_dir / "report.md"
    assert printed == [str(png), str(md)]

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width >= 1000 and height >= 300  # 3 columns of ~5 inch panels at dpi 100

    text = md.read_text()
    assert "![curves](report.png)" in text
    ranked = [line for line in text.splitlines() if line.startswith("| ") and ".ckpt" in line]
    assert [line.split("|")[2].strip() for line in ranked] == [
        "`grpo/checkpoints/step=20.ckpt`", "`grpo/checkpoints/step=10.ckpt`", "`sft/checkpoints/last.ckpt`"]
    assert ranked[0].split("|")[1].strip() == "1" and "0.62" in ranked[0] and "| grpo |" in ranked[0]
    assert "| sft | 39 | — | 0.35 |" in ranked[2]
    assert "step=5.ckpt" not in text
    assert "- grpo step 12: entropy_surge" in text

    sft_part, grpo_part = text.split("## sft")[1].split("## grpo")
    assert "| val/accuracy | 0.35 | 0.4 | 19 |" in sft_part  # final, best (max), best at step
    assert "| val/loss | 0.7 | 0.7 | 39 |" in sft_part  # lower loss is better
    assert "0.99" not in sft_part  # version_0 ignored
    assert "| val/critical_entropy | 0.62 | 0.62 | 20 |" in grpo_part
    assert "| train/reward_mean | 0.5 | 0.5 | 20 |" in grpo_part
    assert "| kl/k3 | 0.02 | 0.001 | 1 |" in grpo_part


def test_build_report_data_and_out_dir(run_dir, tmp_path):
    out = tmp_path / "elsewhere"
    result = build_report(run_dir, out)
    assert result["png"] == out / "report.png" and result["png"].is_file() and result["markdown"].is_file()
    assert not (run_dir / "report.png").exists()
    stages = result["stages"]
    assert list(stages) == ["sft", "grpo"]
    assert stages["sft"]["n_steps"] == 10 and stages["grpo"]["offset"] == 39  # sft's last step
    assert len(stages["grpo"]["series"]["train/entropy"]) == 19  # the "nan" cell skipped
    assert len(stages["grpo"]["series"]["train/grad_norm"]) == 19  # the "oops" cell skipped
    assert result["alarms"] == [{"stage": "grpo", "step": 12, "name": "entropy_surge", "x": 51.0}]


def test_missing_dir_is_a_one_line_error(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1v3 report: error: ") and "nope" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_dir_without_metrics_is_an_error(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1v3 report: error: ") and "metrics.csv" in err and err.count("\n") == 1


def test_header_only_and_empty_stages(tmp_path, capsys):
    write_csv(tmp_path / "run/grpo/logs/version_0/metrics.csv", GRPO_COLUMNS, [])
    (tmp_path / "run/connector/logs/version_0").mkdir(parents=True)
    (tmp_path / "run/connector/logs/version_0/metrics.csv").write_text("")
    assert report_main([str(tmp_path / "run")]) == 0
    text = (tmp_path / "run/report.md").read_text()
    assert "## grpo" in text and "## connector" in text and "Logged steps: 0" in text
    assert (tmp_path / "run/report.png").read_bytes()[:4] == b"\x89PNG"


def test_single_stage_dir(run_dir):
    result = build_report(run_dir / "grpo")
    assert list(result["stages"]) == ["grpo"]
    assert [c["path"] for c in result["checkpoints"]] == ["checkpoints/step=20.ckpt", "checkpoints/step=10.ckpt"]


def test_cli_dispatch(run_dir, capsys):
    from r1v3.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def test_greedy_and_sampled_accuracy_are_separate_series():
    from r1v3.tools.report import series_label

    sft = {"val/accuracy": [(1, 0.6)]}
    grpo = {"val/accuracy": [(1, 0.4)], "val/accuracy_greedy": [(1, 0.6)]}
    # SFT's val/accuracy and GRPO's val/accuracy_greedy are the same quantity (one series);
    # GRPO's val/accuracy is sampled accuracy, its own series with its definition in the legend.
    assert series_label("val/accuracy", sft) == series_label("val/accuracy_greedy", grpo)
    assert series_label("val/accuracy", grpo) != series_label("val/accuracy", sft)
    assert "sampled" in series_label("val/accuracy", grpo) and "greedy" in series_label("val/accuracy", sft)


def test_rollbacks_are_listed_and_marked(run_dir):
    record = {"step": 13, "causes": ["entropy_surge"], "why": "…", "checkpoint": "healthy-step=10.ckpt",
              "restored_step": 10, "lr": [1e-4], "reseeded": True}
    (run_dir / "grpo/checkpoints/rollbacks.jsonl").write_text(json.dumps(record) + "\nnot json\n")
    result = build_report(run_dir)
    assert [(r["stage"], r["step"]) for r in result["rollbacks"]] == [("grpo", 13)]  # the bad line skipped
    text = result["markdown"].read_text()
    rollbacks = text.split("## Rollbacks")[1].split("##")[0]
    assert "- grpo step 13: entropy_surge; restored `healthy-step=10.ckpt` (step 10), learning rate now 0.0001" in rollbacks
    assert "rollback" not in text.split("## Alarms")[1].split("## Rollbacks")[0]
