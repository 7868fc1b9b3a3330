"""SFT throughput on CPU for a tiny-model preset: prints one JSON line.

    python bench/sft_throughput.py --size small --steps 20 --precision bf16-mixed

Figures: median step time, tokens/s (all non-pad tokens through forward + backward) and peak RSS
of the process. The first ``--warmup`` steps are excluded from the median.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from r1v3.tools.tiny import FAMILIES


class StepTimer(Callback):
    def __init__(self):
        self.times, self.tokens, self._t0 = [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(int(batch["inputs"]["attention_mask"].sum()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.backbone import LoadConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage
    from r1v3.tools.tiny import build_tiny

    torch.manual_seed(0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-"))
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    data_dir = work / "data"
    if not (data_dir / "train").exists():
        write_synthetic(data_dir, n_train=args.batch_size * (args.steps + 1), n_val=8, n_ood=8)

    module = SFTStage(str(model_dir), trainable=["vision", "connector", "llm"], val_generate=False,
                      optimizer=OptimizerConfig(lr=1e-4),
                      load=LoadConfig(gradient_checkpointing=args.gradient_checkpointing))
    data = WebDataModule(train=str(data_dir / "train"), batch_size=args.batch_size, max_prompt_length=2048)
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)

    times, tokens = timer.times[args.warmup:], timer.tokens[args.warmup:]
    result = {
        "bench": "sft_throughput", "family": args.family, "size": args.size,
        "params": sum(p.numel() for p in module.model.parameters()),
        "precision": args.precision, "batch_size": args.batch_size, "steps_timed": len(times),
        "step_time_median_s": round(statistics.median(times), 4),
        "tokens_per_s": round(sum(tokens) / sum(times), 1),
        "tokens_per_step_median": statistics.median(tokens),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
