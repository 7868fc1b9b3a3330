"""GRPO step cost on CPU for a tiny-model preset: prints one JSON line per group size.

    python bench/grpo_step.py --size small --groups 4 8 16

Each group size runs in its own process (so peak RSS is per setting) for ``--steps`` rollout
batches of ``--prompts`` prompts; the first ``--warmup`` steps are excluded from the medians.
Breakdown: rollout (generation), reward (scoring pool), old_logprob (only off-policy), forward
(log-probs with grad), backward, and the rest of the step (optimizer, logging).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("step_s", "rollout_s", "reward_s", "old_logprob_s", "forward_s", "backward_s", "update_s",
        "rollout_tokens_per_s", "update_tokens_per_s", "response_len_mean")


def run_one(args) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tiny import build_tiny

    class Collect(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append({k: float(m[f"train/{k}"]) for k in KEYS if f"train/{k}" in m})

    torch.manual_seed(0)
    work = Path(args.workdir)
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    if not (work / "data" / "train").exists():
        write_synthetic(work / "data", n_train=args.prompts * (args.steps + 2), n_val=8, n_ood=8)
    stage = GRPOStage(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                      sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                      reward_kwargs={"num_workers": 1}, rollout_log_every=0)
    collect = Collect()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[collect], log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(work / "data" / "train"), batch_size=args.prompts,
                                                max_prompt_length=4096))
    rows = collect.rows[args.warmup:]
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in KEYS if all(k in r for r in rows)}
    return {"bench": "grpo_step", "family": args.family, "size": args.size, "group_size": args.group_size,
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "precision": args.precision,
            "steps_timed": len(rows), **{f"{k}_median": v for k, v in med.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=("internvl", "qwen2_5_vl", "llava"))
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--group-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-grpo-")
    if args.group_size is not None:
        print(json.dumps(run_one(args)))
        return
    for g in args.groups:
        cmd = [sys.executable, __file__, "--group-size", str(g), "--family", args.family, "--size", args.size,
               "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
               "--workdir", args.workdir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"grpo_step: G={g} failed:\n{out.stderr[-3000:]}")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
