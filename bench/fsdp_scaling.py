"""FSDP2 scaling on CPU: SFT on one process (unsharded) vs two processes (FSDP2 over gloo), same
global batch. Prints one JSON line.

    python bench/fsdp_scaling.py --size small --steps 12

Runs: one process using all cores, one process on one core, two processes (one core each).
Per run: median step time (first ``--warmup`` steps excluded), peak RSS of each process, and the
bytes of parameters and of AdamW state each rank holds. Each run is a subprocess of this script
(``--worker``), which Lightning's launcher forks into the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from r1v3.tools.tiny import FAMILIES


class Probe(Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def local_bytes(tensors) -> int:
    """Bytes this rank stores: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(args) -> None:
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.fsdp import FSDP2Strategy
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage

    torch.manual_seed(0)
    stage = SFTStage(args.model, trainable=["vision", "connector", "llm"], val_generate=False,
                     optimizer=OptimizerConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    probe = Probe()
    strategy = FSDP2Strategy() if args.procs > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=args.procs, strategy=strategy, max_steps=args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[probe])
    data = WebDataModule(train=args.data, batch_size=args.global_batch // args.procs)
    trainer.fit(stage, datamodule=data)
    opt = trainer.optimizers[0]
    record = {
        "rank": trainer.global_rank,
        "step_times": probe.times,
        "param_bytes": local_bytes(stage.model.parameters()),
        "optimizer_state_bytes": local_bytes(v for s in opt.state.values() for v in s.values()
                                             if torch.is_tensor(v) and v.dim() > 0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run(procs: int, threads: int, args, work: Path) -> dict:
    out = work / f"procs{procs}-threads{threads}"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_PORT=str(port),
               MASTER_ADDR="127.0.0.1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", "--procs", str(procs), "--model", args.model, "--data", args.data,
           "--steps", str(args.steps), "--global-batch", str(args.global_batch), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    # A step ends when the slowest rank's ends; ranks are in lockstep through the collectives.
    times = [max(ts) for ts in zip(*(r["step_times"] for r in ranks))][args.warmup:]
    return {
        "processes": procs,
        "threads_per_process": threads,
        "step_time_median_s": round(statistics.median(times), 4),
        "samples_per_s": round(args.global_batch / statistics.median(times), 2),
        "peak_rss_mb_per_process": [round(r["peak_rss_mb"], 1) for r in ranks],
        "param_mb_per_rank": [round(r["param_bytes"] / 2**20, 2) for r in ranks],
        "adamw_state_mb_per_rank": [round(r["optimizer_state_bytes"] / 2**20, 2) for r in ranks],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared by all processes")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-fsdp-bench-"))
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    data_dir = work / "data"
    if not (data_dir / "train").exists():
        write_synthetic(data_dir, n_train=args.global_batch * (args.steps + 1), n_val=8, n_ood=8)
    args.model, args.data = str(model_dir), str(data_dir / "train")
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForImageTextToText
                   .from_pretrained(model_dir).parameters())
    result = {"family": args.family, "size": args.size, "params": n_params, "global_batch": args.global_batch,
              "steps_timed": args.steps - args.warmup, "cores": args.cores,
              # 1 process with all cores, 1 process with one core, then 2 sharded processes with one each
              "runs": [run(1, args.cores, args, work), run(1, 1, args, work),
                       run(2, max(1, args.cores // 2), args, work)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
