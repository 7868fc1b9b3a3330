"""``r1v3 ablate``: the paper's ablations in miniature, on the demo's tiny model and synthetic task.

Each ablation compares arms that start from the same cold-start SFT model, for several seeds, and
turns the per-seed paired difference ``d`` of one pre-set metric into a verdict. ``d`` is oriented
so that the paper's claim (docs/design.md §1) predicts ``d > 0``; with mean m and sample standard
deviation s over the seeds, and a minimum effect τ fixed per ablation below:

- **reproduced**: m > max(s, τ): the effect exceeds both the seed spread and the smallest effect
  worth reporting;
- **not reproduced**: m + s < τ: even one spread above the mean stays below the minimum effect
  (no effect, or the opposite one);
- **inconclusive**: anything else, and always with fewer than 3 seeds.

Rules, metrics and τ are constants in this file, committed before the runs they judge. Arms are the
demo configs plus the overlays in ``configs/ablations/``. Runs are cached per seed under the work
directory, so ablations that share an arm (the trainable-connector GRPO run serves b, c, d and f)
run it once.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable

from r1v3.data_modules import synthetic

REPO = Path(__file__).resolve().parents[2]
DEMO, OVERLAYS = REPO / "configs" / "demo", REPO / "configs" / "ablations"


class Lab:
    """One seed's work directory: tiny model, data, cold start, and cached runs."""

    def __init__(self, root: Path, seed: int, smoke: bool):
        self.root, self.seed, self.smoke = root / f"seed{seed}", seed, smoke
        self.grpo_steps = 4 if smoke else 60
        # Validation is a third of a GRPO run's time: the shared "grpo" arm validates often (its
        # curve feeds the critical-entropy correlation), the others at 30 and 60 steps only.
        self.val_every, self.val_every_sparse = (2, 2) if smoke else (10, 30)

    def setup(self) -> None:
        from r1v3.tools.tiny import build_tiny

        if not (self.root / "model" / "config.json").exists():
            build_tiny("internvl", self.root / "model", seed=self.seed)
        n_train, n_val = (64, 16) if self.smoke else (4000, 256)
        if not (self.root / "data" / "ood").exists():
            synthetic.write_synthetic(self.root / "data", n_train=n_train, n_val=n_val, n_ood=n_val, seed=self.seed)
        for name, levels in (("normal", (1,)), ("hard", (2,)), ("mixed", (1, 2))):
            if not (self.root / name / "train").exists():
                synthetic.write_synthetic(self.root / name, n_train=n_train, n_val=n_val, n_ood=0,
                                          seed=self.seed + 1000, difficulties=levels)

    def run(self, name: str, config: Path, start: Path | None, args: list[str] = (), steps: int | None = None,
            command: str = "fit", overlay: str | None = None, val_every: int | None = None) -> dict:
        """A cached ``r1v3 fit``/``validate``; returns its final val metrics and the run's curves."""
        from r1v3.tools.demo import run_stage
        from r1v3.tools.report import find_metrics, read_metrics

        done = self.root / name / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        extra = ["--seed_everything", str(self.seed), "--data.init_args.seed", str(self.seed),
                 "--trainer.enable_progress_bar", "false", *(["--config", str(OVERLAYS / overlay)] if overlay else []),
                 *args]
        if config.name.startswith("grpo"):
            extra += ["--model.init_args.rollout_seed", str(self.seed), "--model.init_args.rollout", "hf",
                      "--trainer.val_check_interval", str(val_every or self.val_every_sparse),
                      "--trainer.log_every_n_steps", "1"]
        metrics = run_stage(config, self.root, name, steps, extra, model_dir=start, command=command)
        found = find_metrics(self.root / name)
        curves = {k: v for csv in found.values() for k, v in read_metrics(csv).items()}
        result = {"final": metrics, "curves": curves}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result))
        return result

    def cold_start(self) -> Path:
        self.run("cold", DEMO / "sft.yaml", None, steps=20 if self.smoke else 250,
                 args=["--trainer.val_check_interval", "10" if self.smoke else "125"])
        return self.root / "cold" / "hf"

    def grpo(self, name: str, start: Path, overlay: str | None = None, data: str = "data",
             steps: int | None = None) -> dict:
        args = ["--data.init_args.train", str(self.root / data / "train"),
                "--data.init_args.val", str(self.root / data / "val")]
        return self.run(name, DEMO / "grpo.yaml", start, args, steps or self.grpo_steps, overlay=overlay,
                        val_every=self.val_every if name == "grpo" else None)

    def accuracy(self, name: str, model: Path, split: str = "data/val") -> float:
        """Sampled accuracy (T = 1.0, mean of 4 samples; the paper's protocol) of ``model`` on a split."""
        result = self.run(name, DEMO / "grpo.yaml", model, ["--data.init_args.val", str(self.root / split)],
                          command="validate")
        return result["final"]["val/accuracy"]


def tail_mean(curve: list, share: float = 0.2) -> float:
    values = [v for _, v in curve]
    k = max(1, int(len(values) * share))
    return sum(values[-k:]) / k


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return 0.0
    return statistics.correlation(xs, ys)


def alarm_count(curves: dict, names: tuple[str, ...]) -> int:
    return sum(1 for n in names for _, v in curves.get(f"alarm/{n}", []) if v >= 0.5)


# -- the ablations: (claim, metric, τ, arms → per-seed row with "d") -----------------------------------
def rl_vs_sft(lab: Lab) -> dict:
    cold = lab.cold_start()
    rl = lab.grpo("grpo", cold)
    sft = lab.run("sft_distill", DEMO / "sft.yaml", cold, steps=lab.grpo_steps,
                  args=["--trainer.val_check_interval", str(lab.val_every_sparse)])
    ood = {arm: lab.accuracy(f"ood_{arm}", path, "data/ood")
           for arm, path in (("cold", cold), ("rl", lab.root / "grpo" / "hf"), ("sft", lab.root / "sft_distill" / "hf"))}
    ind = {arm: lab.accuracy(f"val_{arm}", path) for arm, path in
           (("rl", lab.root / "grpo" / "hf"), ("sft", lab.root / "sft_distill" / "hf"))}
    del rl, sft
    return {"ood_cold": ood["cold"], "ood_rl": ood["rl"], "ood_sft": ood["sft"], "val_rl": ind["rl"],
            "val_sft": ind["sft"], "d": (ood["rl"] - ood["cold"]) - (ood["sft"] - ood["cold"])}


def connector_frozen(lab: Lab) -> dict:
    from r1v3.callbacks.lr_alarm import repetition_rate

    cold = lab.cold_start()
    arms = {"trainable": lab.grpo("grpo", cold), "frozen": lab.grpo("grpo_frozen_connector", cold, "connector_frozen.yaml")}
    row = {}
    for arm, result in arms.items():
        curves = result["curves"]
        grads = [v for _, v in curves.get("train/grad_norm", [])]
        row[f"reward_{arm}"] = tail_mean(curves["train/reward_mean"])
        row[f"grad_cv_{arm}"] = statistics.pstdev(grads) / max(statistics.fmean(grads), 1e-12) if grads else 0.0
        rollouts = sorted((lab.root / ("grpo" if arm == "trainable" else "grpo_frozen_connector")).rglob("rollouts.jsonl"))
        texts = [json.loads(line)["completion"] for f in rollouts for line in f.read_text().splitlines()[-64:]]
        row[f"repetition_{arm}"] = repetition_rate(texts)
    row["d"] = row["reward_trainable"] - row["reward_frozen"]
    return row


def post_rl_tuning(lab: Lab) -> dict:
    cold = lab.cold_start()
    lab.grpo("grpo", cold)
    row = {}
    for plan in ("connector", "connector_llm", "all"):
        lab.run(f"post_{plan}", DEMO / "connector.yaml", lab.root / "grpo" / "hf", overlay=f"post_rl_{plan}.yaml",
                steps=10 if lab.smoke else 60, args=["--trainer.val_check_interval", "5" if lab.smoke else "20"])
        row[f"acc_{plan}"] = lab.accuracy(f"val_post_{plan}", lab.root / f"post_{plan}" / "hf")
    row["d"] = row["acc_connector"] - max(row["acc_connector_llm"], row["acc_all"])
    return row


def lr_high_low(lab: Lab) -> dict:
    cold = lab.cold_start()
    entropy_alarms = ("entropy_surge", "entropy_collapse")
    low, high = lab.grpo("grpo", cold), lab.grpo("grpo_lr_high", cold, "lr_high.yaml")
    row = {}
    for arm, result in (("low", low), ("high", high)):
        entropy = [v for _, v in result["curves"].get("train/entropy", [])]
        row[f"alarms_{arm}"] = alarm_count(result["curves"], entropy_alarms)
        row[f"entropy_range_{arm}"] = (max(entropy) / max(min(entropy), 1e-9)) if entropy else 1.0
    row["d"] = row["alarms_high"] - row["alarms_low"]
    return row


def curriculum(lab: Lab) -> dict:
    cold = lab.cold_start()
    half = lab.grpo_steps // 2
    lab.grpo("curr_normal", cold, data="normal", steps=half)
    lab.grpo("curr_hard", lab.root / "curr_normal" / "hf", data="hard", steps=lab.grpo_steps - half)
    lab.grpo("mixed", cold, data="mixed")
    row = {"acc_normal_curriculum": lab.accuracy("val_curriculum", lab.root / "curr_hard" / "hf", "normal/val"),
           "acc_normal_mixed": lab.accuracy("val_mixed", lab.root / "mixed" / "hf", "normal/val")}
    row["d"] = row["acc_normal_mixed"] - row["acc_normal_curriculum"]
    return row


def critical_entropy_vs_accuracy(lab: Lab) -> dict:
    curves = lab.grpo("grpo", lab.cold_start())["curves"]
    entropy, accuracy = dict(curves.get("val/critical_entropy", [])), dict(curves.get("val/accuracy", []))
    steps = sorted(set(entropy) & set(accuracy))
    r = pearson([entropy[s] for s in steps], [accuracy[s] for s in steps])
    return {"evaluations": len(steps), "d": r}


ABLATIONS: dict[str, tuple[str, str, float, Callable[[Lab], dict]]] = {
    "a_rl_vs_sft": ("RL generalizes out of domain; SFT on distilled traces degrades it",
                    "d = OOD gain of GRPO − OOD gain of more SFT on the traces (sampled accuracy, held-out clock task)",
                    0.02, rl_vs_sft),
    "b_connector_frozen": ("a frozen connector during RL collapses: reward drops, grad norm unstable, repetitive text",
                           "d = final reward (mean of the last 20% of steps), trainable − frozen connector",
                           0.02, connector_frozen),
    "c_post_rl_tuning": ("after RL, tuning the connector only beats tuning connector+LLM or everything (Table 2)",
                         "d = val accuracy of connector-only − best of connector+LLM and all",
                         0.01, post_rl_tuning),
    "d_lr_high_low": ("a high RL learning rate (1e-5) gives an entropy surge or collapse; a low one (1e-6) is stable",
                      "d = entropy alarms (LRInstabilityAlarm surge+collapse), lr 2e-3 − lr 2e-4",
                      1.0, lr_high_low),
    "e_curriculum": ("a normal→hard curriculum hurts accuracy on normal problems against a mixed schedule",
                     "d = accuracy on the normal split, mixed − curriculum", 0.02, curriculum),
    "f_critical_entropy": ("critical-token entropy tracks checkpoint quality (the paper selects checkpoints by it)",
                           "d = Pearson r between val/critical_entropy and val/accuracy across a run's evaluations",
                           0.3, critical_entropy_vs_accuracy),
}


def verdict(ds: list[float], tau: float) -> str:
    mean = statistics.fmean(ds)
    spread = statistics.stdev(ds) if len(ds) > 1 else math.inf
    if mean > max(spread, tau):
        return "reproduced"
    if mean + spread < tau:
        return "not reproduced"
    return "inconclusive"


def ablate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 ablate", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(ABLATIONS), help=f"any of {', '.join(ABLATIONS)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="runs/ablations")
    parser.add_argument("--smoke", action="store_true", help="a few steps on little data: checks the plumbing only")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ABLATIONS]
    if unknown:
        print(f"r1v3 ablate: error: unknown ablation {unknown[0]!r}; known: {', '.join(ABLATIONS)}", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    labs = [Lab(root, seed, args.smoke) for seed in args.seeds]
    for lab in labs:
        lab.setup()
    table = []
    for name in args.names:
        claim, metric, tau, fn = ABLATIONS[name]
        rows = {lab.seed: fn(lab) for lab in labs}
        ds = [row["d"] for row in rows.values()]
        mean, spread = statistics.fmean(ds), (statistics.stdev(ds) if len(ds) > 1 else float("nan"))
        entry = {"ablation": name, "claim": claim, "metric": metric, "tau": tau, "seeds": rows,
                 "mean_d": mean, "sd_d": spread, "verdict": verdict(ds, tau) if len(ds) >= 3 else "inconclusive"}
        table.append(entry)
        (root / f"{name}.json").write_text(json.dumps(entry, indent=1))
        print(json.dumps({k: entry[k] for k in ("ablation", "mean_d", "sd_d", "verdict")}))
    lines = ["| ablation | paper's claim | metric d (claim predicts d > 0) | τ | d per seed | mean ± sd | verdict |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        per_seed = ", ".join(f"{r['d']:+.3f}" for r in e["seeds"].values())
        lines.append(f"| {e['ablation']} | {e['claim']} | {e['metric']} | {e['tau']} | {per_seed} | "
                     f"{e['mean_d']:+.3f} ± {e['sd_d']:.3f} | **{e['verdict']}** |")
    rule = ("Rule (fixed before the runs): reproduced if mean d > max(sd, τ); not reproduced if mean d + sd < τ; "
            "otherwise inconclusive. Fewer than 3 seeds is always inconclusive.")
    (root / "VERDICTS.md").write_text("\n".join(lines + ["", rule, ""]))
    print(f"verdict table: {root / 'VERDICTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(ablate_main())
