"""Peak memory of GRPO's policy update at a 2k and a 151k-token vocabulary, with whole logits and
with chunked log-probs (``logits_chunk``, r1v3/rl/head.py).

    python bench/logits_memory.py
    python bench/logits_memory.py --size tiny --max-new-tokens 16 --steps 2   # smoke run

Each (vocabulary, chunk) setting runs in its own process: a real GRPO fit (HF engine, InternVL
``small`` by default, ``--prompts`` × G completions of exactly ``--max-new-tokens`` tokens, fp32,
AdamW). Before each ``update`` the child resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``). It reads the mark again right before the optimizer step, which gives
``activation_mb``: the peak of the log-prob forwards and backwards. It reads the mark once more
after the update, which gives ``extra_mb``, the peak including the optimizer step. Both figures are
taken above the resident set just before the update, so the weights, the optimizer state and the
previous step's gradients are not counted. The first update, which allocates the optimizer state,
is left out. The children run with ``MALLOC_MMAP_THRESHOLD_=1048576``. Every setting processes the same tokens; the vocabulary changes only the embedding, the
head and the logits. The gradients and the optimizer step's temporaries grow with the embedding and
head parameters whatever is done about the logits, so only ``activation_mb`` isolates what the
logits cost.

Prints one JSON line per setting, then a summary line with the 151k ÷ 2k ratios of both figures
(the target: at most 1.2 with chunking) and the update-time ratios chunked ÷ whole.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import internvl_and_shards, run_setting, suppress_eos
from memory_8bit import rss_kb
from update_flops import distinct_chars_reward  # noqa: F401  (the child's reward, by import path)


def run_one(args) -> dict:
    import torch
    from lightning.pytorch import Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    class MeasuredGRPO(GRPOStage):
        def update(self, *a, **kw):
            optimizer = self.trainer.optimizers[0]
            if not getattr(self, "hooked", False):  # the peak of the forwards and backwards: read before the step
                optimizer.register_step_pre_hook(lambda *_: self.peaks.append(rss_kb("VmHWM")))
                self.hooked = True
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            before, t0 = rss_kb("VmRSS"), time.perf_counter()
            self.peaks = []
            out = super().update(*a, **kw)
            self.rows.append({"extra_mb": (rss_kb("VmHWM") - before) / 1024,
                              "activation_mb": (max(self.peaks) - before) / 1024,
                              "update_s": time.perf_counter() - t0})
            return out

    torch.manual_seed(0)
    model_dir, train = internvl_and_shards(Path(args.workdir), args.size, n_train=args.prompts, vocab=args.vocab)
    stage = MeasuredGRPO(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                         sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                         reward_fn="update_flops.distinct_chars_reward", rollout_log_every=0,
                         logits_chunk=args.chunk)
    stage.rows = []
    Trainer(accelerator="cpu", max_steps=1 + args.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[suppress_eos()], log_every_n_steps=1).fit(
        stage, datamodule=WebDataModule(train=str(train), batch_size=args.prompts))
    rows = stage.rows[1:]
    return {"bench": "logits_memory", "size": args.size, "vocab": stage.model.config.get_text_config().vocab_size,
            "chunk": args.chunk, "prompts": args.prompts, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "updates": len(rows),
            "extra_mb_median": round(statistics.median(r["extra_mb"] for r in rows), 1),
            "activation_mb_median": round(statistics.median(r["activation_mb"] for r in rows), 1),
            "update_s_median": round(statistics.median(r["update_s"] for r in rows), 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--vocabs", type=int, nargs="+", default=[2048, 151_000])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256])
    for flag, default in (("--prompts", 2), ("--group-size", 8), ("--max-new-tokens", 128), ("--steps", 3)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-logits-")
    if args.run_one:
        print(json.dumps(run_one(args)), flush=True)
        return
    # Blocks of 1 MB and more go back to the system when freed (as for the 8-bit optimizer and the
    # long run, docs/performance.md), so the high-water mark counts what is in use rather than what
    # glibc's heap happened to keep.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    results = {}
    for vocab in args.vocabs:
        for chunk in args.chunks:
            line = run_setting(__file__, raw, ["--run-one", "--vocab", str(vocab), "--chunk", str(chunk),
                                               "--workdir", args.workdir], f"vocab {vocab}, chunk {chunk}", env=env)
            print(line, flush=True)
            results[vocab, chunk] = json.loads(line)
    small, big = min(args.vocabs), max(args.vocabs)
    summary = {"bench": "logits_memory_summary", "vocabs": [small, big]}
    for chunk in args.chunks:
        for key in ("activation_mb", "extra_mb"):
            summary[f"{key.removesuffix('_mb')}_ratio_chunk{chunk}"] = round(
                results[big, chunk][f"{key}_median"] / max(results[small, chunk][f"{key}_median"], 1e-9), 3)
    for vocab in args.vocabs:
        for chunk in args.chunks:
            if chunk and 0 in args.chunks:
                summary[f"time_ratio_v{vocab}_chunk{chunk}_vs_whole"] = round(
                    results[vocab, chunk]["update_s_median"] / results[vocab, 0]["update_s_median"], 3)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
