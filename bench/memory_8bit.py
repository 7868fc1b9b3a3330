"""Memory of a full fine-tune with bitsandbytes AdamW8bit, per parameter, on a ≥0.5B model.

    python bench/memory_8bit.py        # fp32, fp32 with the optimizer in backward, bf16; one process each

The model is the ``medium`` preset (the ``small`` family scaled to ~0.56B parameters, random
weights). Each configuration runs the SFT stage with every module group trainable for ``--steps``
optimizer steps on synthetic samples and reports the peak resident set during training (VmHWM,
reset once the model is loaded) minus the process baseline (VmRSS after imports, before the model),
per parameter, with the breakdown measured on the live objects: weights, gradients, optimizer state
(bitsandbytes keeps 1-byte moments plus per-block scales; tensors under 4096 elements stay 32-bit),
and the remainder (activations, allocator slack, the framework). ``peak_incl_load`` is the peak
including model loading, for reference.

Configurations: ``fp32`` (fp32 weights and gradients), ``fp32-in-backward`` (fp32 weights, each
parameter updated inside the backward and its gradient freed: ``optimizer.in_backward``) and
``bf16`` (bf16 weights and gradients: no fp32 master copy, so updates below bf16's resolution are
lost; shown for reference). Gradient checkpointing is on by default. The children run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed (``--mmap-threshold``): with glibc's adaptive default, freed
gradient-sized blocks stay in the heap and the resident set creeps up step after step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from child import run_setting
from r1v3.tools.tiny import FAMILIES


CONFIGS = ("fp32", "fp32-in-backward", "bf16")


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_one(args) -> dict:
    import resource

    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.backbone import LoadConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir)
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    if not (work / "data" / "train").exists():
        write_synthetic(work / "data", n_train=64, n_val=4, n_ood=4)
    torch.manual_seed(0)
    baseline_kb = rss_kb("VmRSS")

    class Measure(Callback):
        def on_train_start(self, trainer, stage):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: drop the loading peak
            self.after_load_kb = rss_kb("VmRSS")

        def on_after_backward(self, trainer, stage):  # what the step holds (0 when freed in backward)
            self.grads = sum(p.grad.nbytes for p in stage.model.parameters() if p.grad is not None)

        def on_train_end(self, trainer, stage):
            self.peak_kb = rss_kb("VmHWM")
            opts = getattr(trainer.optimizers[0], "inner", trainer.optimizers)
            self.state = sum(v.nbytes for opt in opts for s in opt.state.values() for v in s.values()
                             if torch.is_tensor(v))

    bf16 = args.config == "bf16"
    stage = SFTStage(str(model_dir), trainable=("vision", "connector", "llm"), val_generate=False,
                     load=LoadConfig(dtype="bfloat16" if bf16 else "float32",
                                     gradient_checkpointing=args.gradient_checkpointing),
                     optimizer=OptimizerConfig(name="adamw8bit", lr=1e-5, warmup_ratio=0.0, schedule="constant",
                                               in_backward=args.config.endswith("in-backward")))
    measure = Measure()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                      precision="bf16-true" if bf16 else "32-true", enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[measure])
    trainer.fit(stage, datamodule=WebDataModule(train=str(work / "data" / "train"), batch_size=args.batch_size))
    params = sum(p.numel() for p in stage.model.parameters())
    weights = sum(p.nbytes for p in stage.model.parameters())
    increase = (measure.peak_kb - baseline_kb) * 1024
    per_param = {"weights": weights / params, "gradients": measure.grads / params,
                 "optimizer_state": measure.state / params}
    per_param["activations_and_other"] = increase / params - sum(per_param.values())
    return {"bench": "memory_8bit", "family": args.family, "size": args.size, "config": args.config,
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
            "optimizer": "bitsandbytes.AdamW8bit", "params_m": round(params / 1e6, 1),
            "batch_size": args.batch_size, "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
            "after_load_mb": round(measure.after_load_kb / 1024, 1),
            "baseline_mb": round(baseline_kb / 1024, 1), "peak_mb": round(measure.peak_kb / 1024, 1),
            "peak_incl_load_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bytes_per_param": round(increase / params, 2),
            "breakdown_bytes_per_param": {k: round(v, 2) for k, v in per_param.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES)
    parser.add_argument("--size", default="medium", choices=("tiny", "small", "medium"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="MALLOC_MMAP_THRESHOLD_ for the runs, bytes (0: glibc's adaptive default)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in backward (default on: the memory-lean configuration)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-mem-")
    if args.run_one:
        args.config = args.configs[0]
        print(json.dumps(run_one(args)), flush=True)
        return
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    for config in args.configs:
        print(run_setting(__file__, raw, ["--run-one", "--configs", config, "--workdir", args.workdir], config,
                          env=env), flush=True)


if __name__ == "__main__":
    main()
