"""SFT step, side by side: r1v3's SFTStage vs TRL's SFTTrainer, like for like.

    ~/.cache/r1v3/venv-bench/bin/python bench/compare_trl_sft.py --steps 12
    ~/.cache/r1v3/venv-bench/bin/python bench/compare_trl_sft.py --size tiny --steps 3 --warmup 1   # smoke

Both sides train one saved model directory (InternVL ``small`` by default, built by r1v3 as a
checkpoint from elsewhere would be) on the same synthetic samples in the same order (the epoch plan
of r1v3's data module, seed 0), in fp32, batch ``--batch-size``, AdamW at a constant lr of 1e-5,
gradient clipping at 1, no gradient checkpointing, the loss on the answer tokens only (TRL: a
prompt-completion dataset, whose completion-only loss is its default), all module groups training.
Each side runs in its own process and prints a JSON line: the median step time after ``--warmup``
steps, the tokens per second (the non-pad tokens each step feeds forward and backward), and the
peak RSS. The r1v3 line also carries the ratio of its tokens/s to TRL's.

Packing: r1v3 runs twice, padded (``r1v3-padded``: ``load.padding_free: false``) and padding-free
(``r1v3``, the default: the batch's real tokens as one packed sequence, r1v3/rl/packing.py). TRL
1.16 refuses ``padding_free`` and packing for vision datasets, so its side is padded only.

TRL is the benchmark-only extra; ``bash .ci/setup_bench.sh`` builds its venv on top of the dev venv.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import run_setting, top_ops

SIDES = ("trl", "r1v3-padded", "r1v3")  # TRL first: the r1v3 lines carry the ratio to it


def prepare(args) -> tuple[Path, Path]:
    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir)
    model_dir, data_dir = work / f"internvl-{args.size}", work / "data"
    if not (model_dir / "config.json").exists():
        build_tiny("internvl", model_dir, size=args.size)
    if not (data_dir / "train").exists():
        write_synthetic(data_dir, n_train=args.batch_size * (args.steps + 2), n_val=8, n_ood=8)
    return model_dir, data_dir


class StepProfiler:
    """With ``--profile``, ``torch.profiler`` around the last step (0-based index ``steps - 1``), so
    the timed steps before it run unprofiled; ``top`` then holds its ops with the most self time."""

    def __init__(self, args):
        self.at = args.steps - 1 if args.profile else None
        self.prof, self.top = None, None

    def start(self, step: int) -> None:
        if step == self.at:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def stop(self, step: int) -> None:
        if step == self.at and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.top = top_ops(self.prof)


def result(args, side: str, times: list[float], tokens: list[int], checks: dict, profile=None) -> dict:
    if args.profile:  # the profiled step is not timed
        times, tokens = times[:-1], tokens[:-1]
    times, tokens = times[args.warmup:], tokens[args.warmup:]
    return {"bench": "compare_trl_sft", "side": side, "size": args.size, "batch_size": args.batch_size,
            "steps_timed": len(times), "step_s_median": round(statistics.median(times), 4),
            "tokens_per_step_median": statistics.median(tokens),
            "tokens_per_s": round(statistics.median(n / t for n, t in zip(tokens, times)), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "checks": checks,
            **({"profile_self_time_top": profile} if args.profile else {})}


def run_r1v3(args, model_dir: Path, data_dir: Path) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.backbone import LoadConfig
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl import packing
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage

    class Timer(Callback):
        def __init__(self):
            self.times, self.tokens, self.t0 = [], [], 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            profiler.start(batch_idx)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after the optimizer step
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(int(batch["inputs"]["attention_mask"].sum()))
            profiler.stop(batch_idx)

    torch.manual_seed(0)
    stage = SFTStage(str(model_dir), trainable=["vision", "connector", "llm"], val_generate=False,
                     load=LoadConfig(padding_free=args.run_side == "r1v3"),
                     optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"))
    timer, profiler = Timer(), StepProfiler(args)
    Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
            callbacks=[timer]).fit(stage, datamodule=WebDataModule(str(data_dir / "train"), batch_size=args.batch_size,
                                                                   max_prompt_length=4096))
    return result(args, args.run_side, timer.times, timer.tokens, {"threads": torch.get_num_threads(),
                                                                   "padding_free": packing.enabled(stage.model)},
                  profiler.top)


def run_trl(args, model_dir: Path, data_dir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from r1v3.backbone import load_processor
    from r1v3.chat import build_messages, render_target
    from r1v3.data_modules.webdata import ShardStream, load_sources

    samples = []
    for batch in ShardStream(load_sources(str(data_dir / "train")), batch_size=args.batch_size, seed=0):
        samples += batch["samples"]
        if len(samples) >= args.batch_size * args.steps:
            break
    dataset = Dataset.from_list([
        {"prompt": build_messages(s["question"], len(s["images"]), options=s.get("options")),
         "completion": [{"role": "assistant", "content": [{"type": "text",
                                                           "text": render_target(s.get("trace") or "", s["answer"])}]}],
         "images": s["images"]} for s in samples])
    tokens: list[int] = []

    class CountingSFT(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            profiler.start(state.global_step)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # after clipping and optimizer.step()
            self.times.append(time.perf_counter() - self.t0)
            profiler.stop(state.global_step - 1)  # the step just ended (global_step counts it already)

    config = SFTConfig(
        output_dir=str(Path(args.workdir) / "trl-sft-out"), use_cpu=True, seed=0, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, shuffle_dataset=False,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, fp16=False, packing=False, max_length=None,
        dataloader_drop_last=True, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    torch.manual_seed(0)
    # The processor comes from r1v3's loader only because AutoProcessor insists on a video
    # processor that needs torchvision (absent here); the model is loaded by TRL.
    trainer = CountingSFT(model=str(model_dir), args=config, train_dataset=dataset,
                          processing_class=load_processor(model_dir))
    timer = Timer()
    profiler = StepProfiler(args)
    trainer.add_callback(timer)
    trainer.train()
    return result(args, "trl", timer.times, tokens, {"trl": trl.__version__, "threads": torch.get_num_threads(),
                                                     "completion_only_loss": trainer.args.completion_only_loss,
                                                     "gradient_checkpointing": trainer.model.is_gradient_checkpointing},
                  profiler.top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    for flag, default in (("--steps", 12), ("--warmup", 2), ("--batch-size", 8)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step on each side: the ops with the most self time")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--run-side", default=None, choices=SIDES, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    if args.profile:
        args.steps += 1  # the profiled step comes after the timed ones
    if args.steps <= args.warmup + int(args.profile):
        parser.error("--steps must exceed --warmup")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-trl-sft-")
    model_dir, data_dir = prepare(args)
    if args.run_side:
        run = run_trl if args.run_side == "trl" else run_r1v3
        print(json.dumps(run(args, model_dir, data_dir)), flush=True)
        return
    lines = {}
    for side in SIDES:
        lines[side] = json.loads(run_setting(__file__, raw, ["--run-side", side, "--workdir", args.workdir], side))
    for side in SIDES[1:]:
        lines[side]["tokens_per_s_vs_trl"] = round(lines[side]["tokens_per_s"] / lines["trl"]["tokens_per_s"], 3)
    for side in SIDES:
        print(json.dumps(lines[side]), flush=True)


if __name__ == "__main__":
    main()
