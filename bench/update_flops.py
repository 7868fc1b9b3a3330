"""FLOP/s of GRPO's policy update against this machine's measured matmul peak.

    python bench/update_flops.py --precision fp32 bf16 --profile

Each precision runs in its own process: a real GRPO fit (HF engine, the small preset, G completions
of exactly ``--max-new-tokens`` tokens for ``--prompts`` prompts, on-policy, AdamW) whose ``update``
(log-prob forward, loss, backward, clipping, optimizer step) is timed on even steps and counted
with ``torch.utils.flop_counter.FlopCounterMode`` on odd ones. The prompts are the same every step
(a one-batch dataset), so counted and timed updates do the same work; ``flops_spread`` shows it.
FLOPs are counted on the real step, vision tower included, not estimated as 6·params·tokens. The
same process then times a 2048² matmul in bf16 and fp32 (smaller where one would take over 0.25 s):
the peak the update is measured against. ``--profile`` runs one more update under
``torch.profiler`` and adds the ops with the most self time: where the time goes that the
FLOP count does not explain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import run_setting, suppress_eos, top_ops
from r1v3.tools.tiny import FAMILIES


def count_cpu_attention() -> None:
    """Give FlopCounterMode the CPU flash-attention kernels it has no formula for (torch 2.13
    counts only the CUDA SDPA variants), with its own SDPA formulas: otherwise the attention
    FLOPs of the update would silently count as zero."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)  # the counter passes shapes

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def distinct_chars_reward(items):
    """Cheap, and different across a group's samples, so every row carries a gradient."""
    return [{"reward": len(set(it["response"])) / (len(it["response"]) + 1)} for it in items]


def matmul_peak(dtype, n: int = 2048, repeats: int = 20, budget_s: float = 0.25) -> float:
    """Median GFLOP/s of an n×n matmul, at the largest n (up to ``n``) whose single matmul takes
    under ``budget_s``: a CPU without native bf16 (no AVX-512-BF16/AMX) runs bf16 matmuls in a
    slow reference path, where one 2048² product takes ~45 s."""
    import torch

    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        if size >= n or time.perf_counter() - t0 > budget_s / 8:  # the next size costs 8x
            break
        size *= 2
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
        if sum(times) > 20 * budget_s:
            break
    return 2 * size ** 3 / statistics.median(times) / 1e9


def run_one(args) -> dict:
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.flop_counter import FlopCounterMode

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    class MeasuredGRPO(GRPOStage):
        """GRPO unchanged; its update is either timed or FLOP-counted (the counter's dispatch
        overhead would distort a timing taken under it)."""

        def update(self, *args, **kwargs):
            if args_profile and len(self.timed) + len(self.counted) == 1 + 2 * steps:  # the last one
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    out = super().update(*args, **kwargs)
                self.profile = top_ops(prof)
                return out
            if len(self.timed) + len(self.counted) < 1:  # warm-up: neither
                self.timed.append(None)
                return super().update(*args, **kwargs)
            if len(self.counted) < len(self.timed):
                with FlopCounterMode(display=False) as counter:
                    out = super().update(*args, **kwargs)
                self.counted.append(counter.get_total_flops())
                self.by_op = {str(op).removeprefix("aten.").split(".")[0]: n
                              for op, n in counter.get_flop_counts()["Global"].items()}
                return out
            t0 = time.perf_counter()
            out = super().update(*args, **kwargs)
            self.timed.append(time.perf_counter() - t0)
            return out

    args_profile, steps = args.profile, args.steps
    count_cpu_attention()
    torch.manual_seed(0)
    work = Path(args.workdir)
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    data_dir = work / "data"
    if not (data_dir / "train").exists():
        write_synthetic(data_dir, n_train=args.prompts, n_val=4, n_ood=4)
    stage = MeasuredGRPO(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                         sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                         reward_fn="__main__.distinct_chars_reward", rollout_log_every=0,
                         micro_batch_tokens=args.micro_batch_tokens)
    stage.timed, stage.counted, stage.by_op, stage.profile = [], [], {}, None
    trainer = Trainer(accelerator="cpu", max_steps=1 + 2 * args.steps + int(args.profile), logger=False, enable_checkpointing=False,
                      precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[suppress_eos()], log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(data_dir / "train"), batch_size=args.prompts,
                                                max_prompt_length=4096))
    flops = statistics.median(stage.counted)
    update_s = statistics.median(stage.timed[1:])
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    achieved = flops / update_s / 1e9
    return {"bench": "update_flops", "family": args.family, "size": args.size, "precision": args.precision,
            "prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
            "updates_timed": len(stage.timed) - 1, "update_s_median": round(update_s, 4),
            "update_gflop": round(flops / 1e9, 2),
            "flops_spread": round((max(stage.counted) - min(stage.counted)) / flops, 4),
            "achieved_gflops": round(achieved, 1), "peak_bf16_gflops": round(peaks["bf16"], 1),
            "peak_fp32_gflops": round(peaks["fp32"], 1),
            "share_of_bf16_peak": round(achieved / peaks["bf16"], 3),
            "share_of_own_precision_peak": round(achieved / peaks[args.precision], 3),
            "gflop_by_op": {k: round(v / 1e9, 3) for k, v in sorted(stage.by_op.items(), key=lambda kv: -kv[1])},
            **({"profile_self_time_top": stage.profile} if args.profile else {})}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    for flag, default in (("--prompts", 4), ("--group-size", 8), ("--max-new-tokens", 64), ("--steps", 3),
                          ("--micro-batch-tokens", 8192)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--profile", action="store_true",
                        help="one more update under torch.profiler: the ops with the most self time")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-flops-")
    if args.run_one:
        args.precision = args.precision[0]
        print(json.dumps(run_one(args)), flush=True)
        return
    for precision in args.precision:
        print(run_setting(__file__, raw, ["--run-one", "--precision", precision, "--workdir", args.workdir],
                          precision), flush=True)


if __name__ == "__main__":
    main()
