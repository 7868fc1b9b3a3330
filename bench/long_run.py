"""Memory over a long GRPO run: the process's memory after every step, and its growth.

    ~/.cache/r1v3/venv-vllm/bin/python bench/long_run.py --plot docs/figures/long_run_memory.png
    python bench/long_run.py --size tiny --rollout hf --steps 6 --from-step 2   # smoke run

One GRPO run (InternVL ``small`` preset by default, the embedded vLLM engine, G = 4, 2 prompts,
32 new tokens, fp32) of ``--steps`` steps in a child process started with
``MALLOC_MMAP_THRESHOLD_=1048576``: glibc then returns every block above 1 MB to the system when it
is freed, instead of keeping freed large blocks in its heap, where the resident set would depend on
the history of allocations (docs/performance.md). After each step the child reads its anonymous
resident memory (``RssAnon``, /proc/self/status) and its unique set size (``USS``: the private
pages of /proc/self/smaps_rollup). The engine runs in the same process, so both figures cover the
trainer and vLLM together.

Prints one JSON line: the series, and the growth from step ``--from-step`` to the last step, both
end to end and between the medians of the first and last five steps of that span. ``--plot`` draws
the series to a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from child import internvl_and_shards, run_setting
from sharded_load import anon_kb


def uss_kb() -> int:
    """Private (unshared) resident pages of this process, in kB."""
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def run(args) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    class Measure(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append({"step": trainer.global_step, "rss_anon_mb": round(anon_kb() / 1024, 1),
                              "uss_mb": round(uss_kb() / 1024, 1)})

    torch.manual_seed(0)
    model_dir, train = internvl_and_shards(Path(args.workdir), args.size, n_train=256)
    stage = GRPOStage(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                      sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.new_tokens),
                      reward_kwargs={"num_workers": 1}, rollout_log_every=0, rollout=args.rollout,
                      vllm=VLLMConfig(max_model_len=1024))
    measure = Measure()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[measure], log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(train), batch_size=args.prompts))
    rows = measure.rows
    span = [r for r in rows if r["step"] >= args.from_step]
    out = {"bench": "long_run", "size": args.size, "rollout": args.rollout, "steps": len(rows),
           "from_step": args.from_step, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    for key in ("rss_anon_mb", "uss_mb"):
        first, last = span[0][key], span[-1][key]
        head = statistics.median(r[key] for r in span[:5])
        tail = statistics.median(r[key] for r in span[-5:])
        out[key.replace("_mb", "")] = {"at_from_step_mb": first, "at_end_mb": last, "max_mb": max(r[key] for r in span),
                                       "growth": round(last / first - 1, 4),
                                       "growth_median5": round(tail / head - 1, 4)}
    return out | {"series": rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in result["series"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label in (("rss_anon_mb", "anonymous RSS"), ("uss_mb", "USS")):
        ax.plot(steps, [r[key] for r in result["series"]], label=label)
    ax.axvline(result["from_step"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("MB")
    ax.set_title(f"GRPO, InternVL {result['size']}, {result['rollout']} engine in-process: memory per step")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--rollout", default="vllm", choices=("hf", "vllm"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--from-step", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--plot", default=None, help="write the series as a PNG here")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-long-")
    if args.child:
        print(json.dumps(run(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    line = run_setting(__file__, raw, ["--child", "--workdir", args.workdir], f"{args.steps} steps", env=env)
    result = json.loads(line)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
