"""``r1v3 report RUN_DIR``: plot a run's logged curves to ``report.png`` and summarise it in ``report.md``.

Reads the Lightning CSVLogger ``metrics.csv`` of every stage under RUN_DIR (highest ``version_<k>``
per stage) and the ``X.ckpt.json`` checkpoint sidecars, so it needs no W&B and works on a copied
run directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

STAGE_ORDER = ("sft", "control", "grpo_start", "grpo", "connector")  # the demo's run order
# The three-stage pipeline forms the timeline when present; side runs (the demo's control and its
# GRPO starting-point evaluation) appear in the summary only.
PIPELINE = ("sft", "grpo", "connector")
PANELS = [
    ("reward", ["train/reward_mean"]),
    ("accuracy", ["val/accuracy", "val/accuracy_greedy", "train/accuracy"]),
    ("entropy", ["train/entropy", "val/token_entropy"]),
    ("critical-token entropy", ["val/critical_entropy", "train/critical_entropy"]),
    ("KL", ["kl/k1", "kl/k2", "kl/k3", "train/kl_ref", "kl/policy_drift"]),
    ("grad norm", ["train/grad_norm"]),
    ("learning rate", ["train/lr"]),
    ("loss", ["train/loss", "val/loss"]),
]
# Key metrics of the summary, with the direction in which a value is better.
KEY_METRICS = {"val/accuracy": max, "val/accuracy_greedy": max, "train/reward_mean": max,
               "val/critical_entropy": max, "val/loss": min, "kl/k3": min}
CRITICAL = "val/critical_entropy"


def series_label(col: str, series: dict) -> str:
    """The legend entry of a stage's column. ``val/accuracy`` means different things per stage: the
    SFT and connector stages log greedy accuracy under it, GRPO its sampled accuracy (and greedy
    accuracy as ``val/accuracy_greedy``), so each meaning is its own series, named by definition."""
    if col == "val/accuracy":
        sampled = "val/accuracy_greedy" in series
        return "val accuracy, sampled at the rollout temperature (GRPO)" if sampled else "val accuracy, greedy"
    if col == "val/accuracy_greedy":
        return "val accuracy, greedy"
    if col == "train/accuracy":
        return "train accuracy, sampled rollouts (GRPO)"
    return col


class ReportError(Exception):
    """A problem with the user's input (shown as one line, exit code 2)."""


def _stage_name(path: Path, run_dir: Path, marker: str) -> str:
    """Stage of a file under run_dir: the components before ``marker`` (``logs`` or
    ``checkpoints``); otherwise its parent directories minus Lightning's ``version_<k>``."""
    parts = path.relative_to(run_dir).parts[:-1]
    if marker in parts:
        parts = parts[:parts.index(marker)]
    else:
        parts = tuple(p for p in parts if not re.fullmatch(r"version_\d+", p))
    return "/".join(parts) or run_dir.resolve().name


def _version(path: Path) -> int:
    match = re.search(r"version_(\d+)", path.as_posix())
    return int(match.group(1)) if match else -1


def find_metrics(run_dir: Path) -> dict[str, Path]:
    """Stage name -> its newest metrics.csv (a resumed or re-run stage logs to a new version)."""
    best: dict[str, Path] = {}
    for path in sorted(run_dir.rglob("metrics.csv")):
        stage = _stage_name(path, run_dir, "logs")
        if stage not in best or _version(path) >= _version(best[stage]):
            best[stage] = path
    return best


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Column -> [(step, value)] in file order. CSVLogger leaves cells of metrics not logged at a
    step empty, so empty, non-numeric and non-finite cells are skipped rather than treated as 0."""
    series: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            step = _number(row.get("step"))
            if step is None:
                continue
            for key, cell in row.items():
                value = _number(cell)
                if key and key not in ("step", "epoch") and value is not None:
                    series.setdefault(key, []).append((step, value))
    return series


def _number(cell) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ordered(stages) -> list[str]:
    known = [s for s in STAGE_ORDER if s in stages]
    return known + sorted(s for s in stages if s not in STAGE_ORDER)


def find_checkpoints(run_dir: Path) -> list[dict]:
    """Sidecars of checkpoints that still exist, best critical-token entropy first (missing last):
    the paper selects checkpoints by it rather than by validation loss."""
    rows = []
    for sidecar in sorted(run_dir.rglob("*.ckpt.json")):
        ckpt = sidecar.with_name(sidecar.name[:-len(".json")])
        if not ckpt.is_file():
            continue  # pruned by ModelCheckpoint(save_top_k=...) after the sidecar was written
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        metrics = meta.get("metrics") if isinstance(meta, dict) else None
        metrics = metrics if isinstance(metrics, dict) else {}
        rows.append({"path": ckpt.relative_to(run_dir).as_posix(), "stage": _stage_name(ckpt, run_dir, "checkpoints"),
                     "step": meta.get("step"), "critical_entropy": _number(metrics.get(CRITICAL)),
                     "val_accuracy": _number(metrics.get("val/accuracy"))})
    return sorted(rows, key=lambda r: (r["critical_entropy"] is None, -(r["critical_entropy"] or 0.0), r["path"]))


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def find_rollbacks(run_dir: Path) -> list[dict]:
    """The rollbacks recorded by r1v3.callbacks.Rollback (``rollbacks.jsonl`` beside a stage's checkpoints)."""
    rows = []
    for path in sorted(run_dir.rglob("rollbacks.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                rows.append(record | {"stage": _stage_name(path, run_dir, "checkpoints")})
    return rows


def plot(stages: dict[str, dict], alarms: list[dict], title: str, out: Path) -> None:
    # Figure without pyplot: no global backend state, so it is safe in-process and headless.
    from matplotlib.figure import Figure

    panels = [(name, [c for c in cols if any(c in s["series"] for s in stages.values())]) for name, cols in PANELS]
    panels = [(name, cols) for name, cols in panels if cols]
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    x_end = max((step + info["offset"] for info in stages.values() for points in info["series"].values()
                 for step, _ in points), default=0.0)
    fig = Figure(figsize=(5 * ncols, 3.5 * nrows), dpi=100)
    fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not panels:
        axes[0].text(0.5, 0.5, "no plottable metrics", ha="center", va="center", transform=axes[0].transAxes)
    for i, ax in enumerate(axes):
        if i >= len(panels):
            ax.set_visible(not panels)  # keep only the "no plottable metrics" panel
            continue
        name, cols = panels[i]
        labels: list[str] = []
        for col in cols:
            # One segment per stage in a shared colour: a line joining two stages would suggest a
            # trend between unrelated models.
            for info in stages.values():
                points = sorted((step + info["offset"], v) for step, v in info["series"].get(col, []))
                if not points:
                    continue
                label = series_label(col, info["series"])
                first = label not in labels
                if first:
                    labels.append(label)
                ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{labels.index(label)}",
                        marker=".", markersize=4, label=label if first else None)
        for j, (stage, info) in enumerate(stages.items()):
            if len(stages) > 1:
                if j > 0:
                    ax.axvline(info["offset"], color="grey", linewidth=1)
                ax.text(info["offset"], 0.98, f" {stage}", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=8, color="grey", clip_on=True)
        named = set()
        for alarm in alarms:  # a rollback is drawn solid green, the alarms dashed red
            colour, style = ("green", "-") if alarm["name"] == "rollback" else ("red", "--")
            ax.axvline(alarm["x"], color=colour, linestyle=style, linewidth=1.5 if colour == "green" else 1)
            if i == 0 and alarm["name"] not in named:  # name each alarm once, on one panel
                named.add(alarm["name"])
                ax.text(alarm["x"], 0.5 if colour == "green" else 0.02, f" {alarm['name']}",  # apart from its alarm's
                        transform=ax.get_xaxis_transform(), rotation=90, va="bottom", fontsize=8, color=colour,
                        clip_on=True)
        if x_end > 0:  # a shared x range keeps the stage boundaries aligned across panels
            ax.set_xlim(0, x_end * 1.01)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")


def summary_markdown(title: str, stages: dict[str, dict], alarms: list[dict], checkpoints: list[dict],
                     png_name: str, rollbacks: list[dict] = ()) -> str:
    lines = [f"# Run report: {title}", ""]
    for stage, info in stages.items():
        lines += [f"## {stage}", "", f"Logged steps: {info['n_steps']} (`{info['csv']}`)", ""]
        if info["metrics"]:
            lines += ["| metric | final | best | best at step |", "|---|---|---|---|"]
            lines += [f"| {k} | {_fmt(m['final'])} | {_fmt(m['best'])} | {_fmt(m['best_step'])} |"
                      for k, m in info["metrics"].items()]
            lines.append("")
    lines += ["## Alarms", ""]
    lines += [f"- {a['stage']} step {a['step']}: {a['name']}" for a in alarms if a["name"] != "rollback"] or ["None."]
    lines += ["", "## Rollbacks", ""]
    lines += [f"- {r['stage']} step {r['step']}: {', '.join(r.get('causes', []))}; restored `{r.get('checkpoint')}` "
              f"(step {r.get('restored_step')}), learning rate now {', '.join(f'{lr:.3g}' for lr in r.get('lr', []))}"
              for r in rollbacks] or ["None."]
    lines += ["", "## Checkpoints ranked by critical-token entropy", ""]
    if checkpoints:
        lines += ["| rank | checkpoint | stage | step | critical entropy | val accuracy |", "|---|---|---|---|---|---|"]
        lines += [f"| {i} | `{c['path']}` | {c['stage']} | {_fmt(c['step'])} | {_fmt(c['critical_entropy'])} "
                  f"| {_fmt(c['val_accuracy'])} |" for i, c in enumerate(checkpoints, 1)]
    else:
        lines.append("No checkpoint sidecars found.")
    lines += ["", f"![curves]({png_name})", ""]
    return "\n".join(lines)


def build_report(run_dir: Path, out_dir: Path | None = None) -> dict:
    """Write report.png and report.md for run_dir into out_dir (default run_dir); return their
    paths and the summary data. Raises ReportError for a missing directory or one without metrics."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    found = find_metrics(run_dir)
    if not found:
        raise ReportError(f"no metrics.csv under {run_dir}")
    stages: dict[str, dict] = {}
    offset = 0.0
    alarms: list[dict] = []
    # Stages are laid end to end, so each starts where the previous one's steps ended.
    timeline = [s for s in _ordered(found) if s in PIPELINE] or _ordered(found)
    for stage in _ordered(found):
        series = read_metrics(found[stage])
        steps = {step for points in series.values() for step, _ in points}
        metrics = {}
        for key, better in KEY_METRICS.items():
            if series.get(key):
                best_step, best = better(series[key], key=lambda p: p[1])
                metrics[key] = {"final": series[key][-1][1], "best": best, "best_step": int(best_step)}
        on_timeline = stage in timeline
        for key, points in series.items():
            if key.startswith("alarm/") and key != "alarm/rollback":  # rollbacks come from their own record
                alarms += [{"stage": stage, "step": int(s), "name": key[len("alarm/"):],
                            "x": s + offset if on_timeline else None} for s, v in points if v >= 0.5]
        stages[stage] = {"csv": found[stage].relative_to(run_dir).as_posix(), "series": series, "offset": offset,
                         "n_steps": len(steps), "metrics": metrics, "plotted": on_timeline}
        if on_timeline:
            offset += max(steps, default=0.0)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / "report.png", out_dir / "report.md"
    title = run_dir.resolve().name
    checkpoints = find_checkpoints(run_dir)
    rollbacks = find_rollbacks(run_dir)
    # A record's step counts the update whose alarm fired; Lightning logs that batch's metrics
    # (the alarm's among them) one step earlier, so the line goes where the alarm's does.
    marks = [a for a in alarms if a["x"] is not None] + [
        {"name": "rollback", "x": r["step"] - 1 + stages[r["stage"]]["offset"]} for r in rollbacks
        if r["stage"] in stages and stages[r["stage"]]["plotted"]]
    plot({k: v for k, v in stages.items() if v["plotted"]}, marks, title, png)
    md.write_text(summary_markdown(title, stages, alarms, checkpoints, png.name, rollbacks), encoding="utf-8")
    return {"png": png, "markdown": md, "stages": stages, "alarms": alarms, "checkpoints": checkpoints,
            "rollbacks": rollbacks}


def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (e.g. runs/demo) or a single stage directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        result = build_report(args.run_dir, args.out)
    except (ReportError, OSError) as err:
        print(f"r1v3 report: error: {err}", file=sys.stderr)
        return 2
    print(result["png"])
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
