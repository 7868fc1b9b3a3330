"""Host memory of loading a model under FSDP2: each rank reading only its shard (r1v3's sharded load)
against every rank loading the whole checkpoint first (the path before it).

    python bench/sharded_load.py --model-dir DIR     # a checkpoint; default: the medium preset, built once
    python bench/sharded_load.py --modes sharded --ranks 2

Each rank runs in its own process (gloo). It samples its anonymous resident memory (``RssAnon``:
pages of the memory-mapped safetensors files are shared page cache, which plain RSS would count)
every 2 ms from just before the load until the model is sharded and filled, and reports the peak
above its baseline beside its shard's size and the largest slice it read. In the sharded mode it
then writes the consolidated HF export (``r1v3.sharded_load.save_sharded``) and reports that
step's peak above the loaded model's memory. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path


def anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class Peak:
    """The largest ``RssAnon`` seen by a 2-ms sampling thread while in the ``with`` block."""

    def __enter__(self):
        self.peak, self.running = anon_kb(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, anon_kb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anon_kb())


def rank_main(rank: int, world: int, port: int, model_dir: str, mode: str, dtype: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from r1v3.backbone import load_backbone
    from r1v3.fsdp import shard_backbone

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    dist.barrier()
    baseline = anon_kb()
    with Peak() as peak:
        model = load_backbone(model_dir, dtype=dtype, on_meta=mode == "sharded").model
        shard_backbone(model, mesh)  # on the meta device: reads this rank's rows
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    # The sharded load reads one rank's rows of one tensor at a time, in the file's dtype.
    largest = max(p.to_local().numel() for p in model.parameters()) * file_itemsize(model_dir) if mode == "sharded" else 0
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"rank": rank, "peak_above_baseline_mb": (peak.peak - baseline) / 1024, "shard_mb": shard / 2**20,
              "largest_slice_mb": largest / 2**20, "full_model_mb": full / 2**20, "baseline_mb": baseline / 1024}
    if mode == "sharded":  # the consolidated HF export, from the sharded model, without a gather
        from r1v3.sharded_load import save_sharded

        before = anon_kb()
        with Peak() as peak:
            save_sharded(model, Path(out, "export"))
        record["export_peak_above_loaded_mb"] = (peak.peak - before) / 1024
        if rank == 0:
            record["export_files_mb"] = sorted(round(f.stat().st_size / 2**20)
                                               for f in Path(out, "export").glob("*.safetensors"))
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def file_itemsize(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(next(Path(model_dir).glob("*.safetensors"))), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).element_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_dir: str, mode: str, ranks: int, dtype: str) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(ranks, free_port(), model_dir, mode, dtype, out), nprocs=ranks,
                           start_method="spawn", join=True)
        return [json.loads(Path(out, f"{mode}-{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="checkpoint to load (default: the medium InternVL preset, built once)")
    parser.add_argument("--modes", default="sharded,full", help="sharded, full or both (comma-separated)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    # glibc's adaptive threshold keeps freed large blocks in the heap; fixed, they go back at once.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model_dir = args.model_dir
    if model_dir is None:
        from r1v3.tools.tiny import build_tiny

        model_dir = str(Path(tempfile.gettempdir()) / "r1v3-bench-medium-internvl")
        if not (Path(model_dir) / "config.json").is_file():
            build_tiny("internvl", model_dir, size="medium")
    result = {"model_dir": model_dir, "ranks": args.ranks, "dtype": args.dtype}
    for mode in args.modes.split(","):
        result[mode] = measure(model_dir, mode, args.ranks, args.dtype)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
