"""GRPO step cost on CPU as the work grows: one JSON line per (group size G, completion length).

    python bench/grpo_step.py --size small --groups 4 8 16 32 --lengths 64 128 256

Each setting runs in its own process (so peak RSS is per setting) for ``--steps`` rollout batches
of ``--prompts`` prompts; the first ``--warmup`` steps are excluded from the medians. EOS is
suppressed, so every completion is exactly the length asked for and the tokens per step are
prompts × G × length. Breakdown: rollout (generation), reward (scoring pool), old_logprob (only
off-policy), forward (log-probs with grad), backward, and the rest of the step (optimizer,
logging). ``ms_per_token`` is the step time per generated token; the last line compares the
largest setting's with the middle ones' (the flatness target of the performance work).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from child import run_setting
from r1v3.tools.tiny import FAMILIES

KEYS = ("step_s", "rollout_s", "reward_s", "old_logprob_s", "forward_s", "backward_s", "update_s",
        "rollout_tokens_per_s", "update_tokens_per_s", "response_len_mean")


def run_one(args) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    class Collect(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append({k: float(m[f"train/{k}"]) for k in KEYS if f"train/{k}" in m})

        def on_fit_start(self, trainer, stage):  # fixed-length completions: equal work per setting
            stage.engine.suppress_tokens.append(stage.tokenizer.eos_token_id)

    torch.manual_seed(0)
    work = Path(args.workdir)
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    if not (work / "data" / "train").exists():
        write_synthetic(work / "data", n_train=args.prompts * (args.steps + 2), n_val=8, n_ood=8)
    stage = GRPOStage(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                      sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                      reward_kwargs={"num_workers": 1}, rollout_log_every=0, rollout=args.rollout,
                      vllm=VLLMConfig(max_model_len=2048))
    collect = Collect()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[collect], log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(work / "data" / "train"), batch_size=args.prompts,
                                                max_prompt_length=4096))
    rows = collect.rows[args.warmup:]
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in KEYS if all(k in r for r in rows)}
    tokens = args.prompts * args.group_size * args.max_new_tokens
    return {"bench": "grpo_step", "family": args.family, "size": args.size, "group_size": args.group_size,
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "precision": args.precision,
            "rollout": args.rollout, "steps_timed": len(rows), "tokens_per_step": tokens,
            "ms_per_token": round(1000 * med["step_s"] / tokens, 3), **{f"{k}_median": v for k, v in med.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--group-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rollout", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--workdir", default=None)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-grpo-")
    if args.group_size is not None:
        print(json.dumps(run_one(args)))
        return
    per_token = {}
    for length in args.lengths:
        for g in args.groups:
            line = run_setting(__file__, raw, ["--group-size", str(g), "--max-new-tokens", str(length),
                                               "--workdir", args.workdir], f"G={g}, length {length}")
            per_token[(g, length)] = json.loads(line)["ms_per_token"]
            print(line, flush=True)
    largest = (max(args.groups), max(args.lengths))
    middle_length = sorted(args.lengths)[(len(args.lengths) - 1) // 2]
    ratios = {f"G{g}_len{middle_length}": round(per_token[largest] / per_token[(g, middle_length)], 3)
              for g in args.groups if (g, middle_length) != largest}
    print(json.dumps({"bench": "grpo_step", "largest": f"G{largest[0]}_len{largest[1]}",
                      "largest_ms_per_token_over": ratios}), flush=True)


if __name__ == "__main__":
    main()
