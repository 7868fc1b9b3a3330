"""Policy-loss variants side by side on the demo task: one JSON line per (variant, seed), then one
summary line per variant and a markdown table for docs/algorithms.md.

    python bench/loss_variants.py --seeds 0 1 2 --workdir runs/variants

Every variant starts from the same cold-start SFT model of its seed (``r1v3 ablate``'s lab: the
demo's tiny InternVL, synthetic shards, 250 SFT steps), runs the same number of optimizer steps of
``configs/demo/grpo.yaml`` with its overlay from ``configs/variants/`` (each paper's hyperparameters,
fixed before any run), and is off-policy: ``--mini-batches`` optimizer updates per rollout batch, so
the importance ratios leave 1 and the variants actually differ. The figures are the sampled
validation accuracy (T = 1, 4 samples per question, the paper's protocol) at the end, its rise over
the SFT start, and the wall time of the GRPO run. Runs are cached per seed under the work directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("grpo", "dapo", "drgrpo", "gspo", "cispo", "sapo")


def run_variant(lab, cold: Path, variant: str, steps: int, mini_batches: int) -> dict:
    from r1v3.tools.ablations import DEMO

    args = ["--config", str(REPO / "configs" / "variants" / f"{variant}.yaml"),
            "--model.init_args.mini_batches", str(mini_batches),
            "--data.init_args.train", str(lab.root / "data" / "train"),
            "--data.init_args.val", str(lab.root / "data" / "val")]
    # val_check_interval counts rollout batches; max_steps counts optimizer updates
    result = lab.run(f"variant_{variant}", DEMO / "grpo.yaml", cold, args, steps, val_every=max(1, steps // mini_batches))
    return result["final"]


def summary(rows: list[dict], variant: str) -> dict:
    mine = [r for r in rows if r["variant"] == variant]

    def mean_sd(key: str) -> tuple[float, float]:
        values = [r[key] for r in mine]
        return round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0

    out = {"variant": variant, "seeds": len(mine)}
    for key in ("accuracy", "rise", "seconds"):
        out[f"{key}_mean"], out[f"{key}_sd"] = mean_sd(key)
    return out


def table(summaries: list[dict]) -> str:
    lines = ["| variant | final sampled accuracy | rise over SFT start | GRPO wall time (s) |", "|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['variant']} | {s['accuracy_mean']:.3f} ± {s['accuracy_sd']:.3f} | "
                     f"{s['rise_mean']:+.3f} ± {s['rise_sd']:.3f} | {s['seconds_mean']:.0f} ± {s['seconds_sd']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every GRPO run")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer updates per rollout batch (> 1: off-policy)")
    parser.add_argument("--workdir", default="runs/variants")
    parser.add_argument("--smoke", action="store_true", help="a few steps on little data: checks the plumbing only")
    args = parser.parse_args(argv)
    from r1v3.tools.ablations import Lab

    rows = []
    for seed in args.seeds:
        lab = Lab(Path(args.workdir), seed, args.smoke)
        lab.setup()
        cold = lab.cold_start()
        start = lab.accuracy("val_cold", cold)
        steps = 4 if args.smoke else args.steps
        for variant in args.variants:
            final = run_variant(lab, cold, variant, steps, args.mini_batches)
            row = {"variant": variant, "seed": seed, "start": round(start, 4),
                   "accuracy": round(final["val/accuracy"], 4), "rise": round(final["val/accuracy"] - start, 4),
                   "seconds": final["seconds"], "steps": final["steps"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summaries = [summary(rows, v) for v in args.variants]
    for s in summaries:
        print(json.dumps(s), flush=True)
    print(table(summaries), file=sys.stderr)
    print(json.dumps({"variants": summaries, "steps": steps, "mini_batches": args.mini_batches,
                      "seeds": args.seeds}), flush=True)


if __name__ == "__main__":
    main()
