"""A collapse on the demo task, with and without the rollback action.

    python bench/rollback.py --figure docs/figures/rollback.png --report-figure docs/figures/rollback_report.png
    python bench/rollback.py --sft-steps 10 --steps 8 --spike-at 3   # smoke run

The demo's own configs, with the demo's paths moved into a work directory: a tiny InternVL and
synthetic visual-math shards, a cold-start SFT (configs/demo/sft.yaml, ``--sft-steps``), then two
GRPO runs from its export (configs/demo/grpo.yaml, ``--steps``, every step logged). Both multiply
the learning rate by ``--spike-factor`` for two steps at ``--spike-at`` (``r1v3.callbacks.fault.LRSpike``)
and keep healthy checkpoints every ``--healthy-every`` steps; one also has ``r1v3.callbacks.Rollback``.

Prints one JSON line: each run's reward before the spike and over its last 10 steps, the rollbacks,
and the reward series. ``--figure`` draws both reward and entropy curves; ``--report-figure``
copies the ``r1v3 report`` image of the run with the action.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def config(name: str, work: Path, edit, tag: str = "") -> Path:
    """configs/demo/<name>.yaml with runs/demo moved to ``work``, after ``edit(dict)``."""
    data = yaml.safe_load((REPO / "configs" / "demo" / f"{name}.yaml").read_text().replace("runs/demo", str(work)))
    edit(data)
    path = work / f"{name}{tag}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fit(path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "r1v3.cli", "fit", "--config", str(path)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"rollback bench: {path.name} failed:\n{out.stderr[-4000:]}")


def series(run: Path, metric: str) -> dict[int, float]:
    values = {}
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with path.open() as fh:
            values |= {int(row["step"]): float(row[metric]) for row in csv.DictReader(fh) if row.get(metric)}
    return values


def grpo(work: Path, start: Path, args, action: bool) -> Path:
    run = work / ("with_rollback" if action else "without")

    def edit(cfg):
        trainer = cfg["trainer"]
        trainer.update(max_steps=args.steps, log_every_n_steps=1, val_check_interval=args.steps,
                       limit_val_batches=1, default_root_dir=str(run))
        trainer["logger"]["init_args"]["save_dir"] = str(run)
        callbacks = [{"class_path": "r1v3.callbacks.fault.LRSpike",
                      "init_args": {"at_step": args.spike_at, "factor": args.spike_factor, "steps": 2}}]
        for cb in trainer["callbacks"]:
            if cb["class_path"].endswith("RankedCheckpoint"):
                if action:
                    callbacks.append({"class_path": "r1v3.callbacks.Rollback"})
                cb["init_args"].update(dirpath=str(run / "checkpoints"), keep_healthy=2,
                                       healthy_every_n_steps=args.healthy_every)
            callbacks.append(cb)
        trainer["callbacks"] = callbacks
        cfg["model"]["init_args"].update(model_path=str(start), export_dir=None, rollout_log_every=0)
    fit(config("grpo", work, edit, tag=f"-{run.name}"))
    return run


def summary(run: Path, spike_at: int) -> dict:
    reward = series(run, "train/reward_mean")
    steps = sorted(reward)
    before = [reward[s] for s in steps if s < spike_at][-10:]
    rollbacks = run / "checkpoints" / "rollbacks.jsonl"
    return {"reward_before_spike": round(sum(before) / max(len(before), 1), 4),
            "reward_last10": round(sum(reward[s] for s in steps[-10:]) / min(10, len(steps)), 4),
            "rollbacks": [json.loads(line) for line in rollbacks.read_text().splitlines()] if rollbacks.exists() else [],
            "reward": [round(reward[s], 4) for s in steps], "entropy": [round(v, 4) for v in
                                                                     series(run, "train/entropy").values()]}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key in zip(axes, ("reward", "entropy")):
        for name, label in (("without", "no action"), ("with_rollback", "with Rollback")):
            ax.plot(range(1, len(result[name][key]) + 1), result[name][key], label=label)
        ax.axvspan(result["spike_at"] + 1, result["spike_at"] + 2, color="orange", alpha=0.3, label="LR spike")
        for r in result["with_rollback"]["rollbacks"]:
            ax.axvline(r["step"], color="green", linewidth=1.5)
        ax.set_xlabel("GRPO step")
        ax.set_title(f"train {key}" + (" (green: rollback)" if key == "reward" else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--spike-at", type=int, default=25)
    parser.add_argument("--spike-factor", type=float, default=100.0)
    parser.add_argument("--healthy-every", type=int, default=5)
    parser.add_argument("--figure", default=None, help="reward and entropy of both runs, as a PNG")
    parser.add_argument("--report-figure", default=None, help="copy the run-with-action's r1v3 report image here")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-rollback-"))
    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.tools.report import build_report
    from r1v3.tools.tiny import build_tiny

    if not (work / "sft" / "hf" / "config.json").exists():
        build_tiny("internvl", work / "model")
        write_synthetic(work / "data")

        def edit(cfg):
            cfg["trainer"].update(max_steps=args.sft_steps, limit_val_batches=0)
            cfg["trainer"]["callbacks"] = []
        fit(config("sft", work, edit))
    result = {"bench": "rollback", "sft_steps": args.sft_steps, "steps": args.steps, "spike_at": args.spike_at,
              "spike_factor": args.spike_factor}
    for action in (False, True):
        run = grpo(work, work / "sft" / "hf", args, action)
        result[run.name] = summary(run, args.spike_at)
    if args.figure:
        plot(result, args.figure)
    if args.report_figure:
        shutil.copy(build_report(work / "with_rollback")["png"], args.report_figure)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
