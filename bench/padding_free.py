"""Padding-free (packed) forwards against padded batches: GRPO's policy forward/backward at the
demo's real completion lengths, and an SFT step on the synthetic think-before-answer traces.

    python bench/padding_free.py --rollouts <demo>/grpo/logs/version_0/rollouts.jsonl --tokenizer <demo>/model
    python bench/padding_free.py --fixed                         # equal lengths: what packing costs
    python bench/padding_free.py ... --compile                   # then the compiled layers (load.compile)
    python bench/padding_free.py --size tiny --repeats 2        # smoke run: lengths drawn uniformly

GRPO: ``--prompts`` prompts of the synthetic shards with G completions each, whose lengths are drawn
(seeded) from the completions a demo run logged (its ``rollouts.jsonl``, re-tokenized with the
demo's tokenizer, EOS counted), padded to ``--max-new-tokens``; the timed work is the shared prompt
pass, the completion pass, the log-probs, the clipped policy loss and the backward, as one micro-batch
(what ``GRPOStage.update`` runs per micro-batch). SFT: ``SFTStage.supervised_loss`` and its backward
on a batch of ``--sft-batch`` traces. Each (precision, packed) setting runs ``--repeats`` times
after one warm-up, in the same process on the same inputs; medians in seconds. Prints one JSON line
per workload and precision with the padded ÷ packed speed-up and the share of padding tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from child import internvl_and_shards


def demo_lengths(rollouts: str | None, tokenizer: str | None, cap: int) -> list[int]:
    """Completion lengths in tokens from a demo run's logged rollouts (EOS counted for those that
    stopped), capped at ``cap``; without a log, uniform over 1..cap (smoke runs)."""
    if not rollouts:
        return list(range(1, cap + 1))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = [json.loads(line) for line in Path(rollouts).read_text().splitlines() if line.strip()]
    return [min(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + (r["finish"] == "stop"), cap)
            for r in rows]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, seconds of the first call): the first is a warm-up (allocator, thread
    pools, and for a compiled model the compile itself)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--rollouts", default=None, help="a demo run's rollouts.jsonl (grpo/logs/version_0)")
    parser.add_argument("--tokenizer", default=None, help="the demo's model directory (its tokenizer)")
    parser.add_argument("--fixed", action="store_true", help="every completion --max-new-tokens long: no padding")
    parser.add_argument("--compile", action="store_true",
                        help="then compile the decoder layers (load.compile) and time the packed passes again")
    for flag, default in (("--prompts", 4), ("--group-size", 8), ("--max-new-tokens", 48), ("--sft-batch", 8),
                          ("--repeats", 5), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.encoding import PromptEncoder
    from r1v3.logprobs import gather_logprobs
    from r1v3.rl import packing, prefix
    from r1v3.rl.losses import policy_loss
    from r1v3.stages.sft import SFTStage

    torch.manual_seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-packing-"))
    model_dir, train = internvl_and_shards(work, args.size, n_train=max(args.prompts, args.sft_batch))
    stage = SFTStage(str(model_dir), val_generate=False)
    stage.configure_model()
    model = stage.model.train()
    if not packing.enabled(model):
        sys.exit("padding_free: the model's attention does not allow packing")

    pool = [args.max_new_tokens] if args.fixed else demo_lengths(args.rollouts, args.tokenizer, args.max_new_tokens)
    draw = random.Random(args.seed)
    n, width = args.prompts * args.group_size, args.max_new_tokens
    lengths = torch.tensor([draw.choice(pool) for _ in range(n)])
    tok = stage.processor.tokenizer
    ids = torch.randint(10, len(tok) - 10, (n, width))
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids[mask == 0] = tok.pad_token_id
    advantages = torch.randn(n)

    data = WebDataModule(train=str(train), batch_size=max(args.prompts, args.sft_batch))
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    encoder = PromptEncoder(stage.processor, family=stage.backbone.family)
    tokens, images = encoder.encode_prompts(meta["prompt_text"][:args.prompts], meta["pil_images"][:args.prompts])
    index = torch.arange(args.prompts).repeat_interleave(args.group_size)
    data.collate_mode = "sft"
    sft_batch = next(iter(data.train_dataloader()))

    def grpo_step(autocast):
        def run():
            model.zero_grad(set_to_none=True)
            with autocast():
                logits = prefix.completion_logits(model, tokens, images, index, ids, mask)
            logp = gather_logprobs(logits.float(), ids)
            loss, _ = policy_loss(logp, logp.detach(), advantages, mask.float(), 0.2, 0.2, "seq-mean-token-mean")
            loss.backward()
        return run

    def sft_step(autocast):
        def run():
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = stage.supervised_loss(sft_batch)
            loss.backward()
        return run

    sft_mask = sft_batch["inputs"]["attention_mask"]
    workloads = {"grpo_update": (grpo_step, float(mask.float().mean()), int(mask.sum()), n),
                 "sft_step": (sft_step, float(sft_mask.float().mean()), int(sft_mask.sum()), sft_mask.shape[0])}
    results = []
    for name, (make, real_share, real_tokens, rows) in workloads.items():
        for precision in args.precisions:
            def autocast(p=precision):
                return torch.autocast("cpu", dtype=torch.bfloat16) if p == "bf16" else contextlib.nullcontext()
            packed, _ = timed(make(autocast), args.repeats)
            with packing.disabled(model):
                padded, _ = timed(make(autocast), args.repeats)
            results.append({"bench": "padding_free", "workload": name, "size": args.size, "precision": precision,
                            "rows": rows, "real_tokens": real_tokens, "padding_share": round(1 - real_share, 3),
                            "lengths": "fixed" if args.fixed else "demo rollouts" if args.rollouts else "uniform",
                            "padded_s": round(padded, 4), "packed_s": round(packed, 4),
                            "speedup": round(padded / packed, 3), "autocast": autocast})
    if args.compile:  # last: compiling cannot be undone in this process
        packing.compile_layers(model)
        for row in results:
            make = workloads[row["workload"]][0]
            compiled, first = timed(make(row["autocast"]), args.repeats)
            row |= {"compiled_s": round(compiled, 4), "first_call_compiled_s": round(first, 2),
                    "speedup_compiled_vs_packed": round(row["packed_s"] / compiled, 3),
                    "speedup_compiled_vs_padded": round(row["padded_s"] / compiled, 3)}
    for row in results:
        row.pop("autocast")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
