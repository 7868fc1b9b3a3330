"""Rollout throughput: HF ``generate`` vs the embedded vLLM engine, same model, prompts and images.

    <vllm venv>/bin/python bench/rollout.py --size small --groups 4 8 16

Runs in the vLLM environment (.ci/setup_vllm.sh). For each G it times one call per engine with all
prompts × G samples (each engine batched at its best: HF generate in one batch in fp32, its fastest
precision here; vLLM in ``--vllm-dtype``, bf16 by default), after a warm-up call, and prints one
JSON line: tokens/s of each engine, their ratio, and the weight-sync time (full model, bucketed) as
a share of a GRPO step (rollout on vLLM + sync + the policy's forward and backward on the rollouts).
EOS is suppressed on both engines, so both generate exactly ``--max-new-tokens`` per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from r1v3.tools.tiny import FAMILIES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    from r1v3 import backbone as bb
    from r1v3.data_modules.synthetic import generate
    from r1v3.rl.rollout import Prompt, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine, vllm_name_mapper
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-rollout-"))
    model_dir = work / f"{args.family}-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny(args.family, model_dir, size=args.size)
    stage = GRPOStage(str(model_dir), rollout_log_every=0)
    stage.setup("fit")
    stage.configure_model()
    suppress = bb.multimodal_token_ids(stage.processor) + [stage.tokenizer.eos_token_id]  # equal work
    stage.engine.suppress_tokens = list(suppress)
    engine = VLLMEngine(str(model_dir), VLLMConfig(max_model_len=1024, dtype=args.vllm_dtype),
                        rename=vllm_name_mapper(stage.backbone.family), group_of=stage.backbone.group_of,
                        suppress_tokens=suppress)
    from r1v3.chat import render_prompt

    samples = list(generate(args.prompts, ("count", "add_digits"), seed=0))
    prompts = [Prompt(render_prompt(stage.processor, s["question"], 1), s["images"]) for s in samples]

    def timed(eng, sampling):
        eng.generate(prompts, sampling, seed=0)  # warm-up
        runs = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            out = eng.generate(prompts, sampling, seed=r + 1)
            runs.append((time.perf_counter() - t0, float(out.completion_mask.sum()), out))
        return statistics.median(t for t, _, _ in runs), sum(n for _, n, _ in runs) / len(runs), runs[-1][2]

    for g in args.groups:
        sampling = SamplingConfig(n=g, max_new_tokens=args.max_new_tokens)
        hf_s, hf_tokens, _ = timed(stage.engine, sampling)
        vllm_s, vllm_tokens, rollouts = timed(engine, sampling)
        syncs = []
        for _ in range(args.repeats):
            syncs.append(engine.sync_weights(stage.model, None, force=True)["s"])
        rows = torch.arange(rollouts.completion_ids.shape[0])
        t0 = time.perf_counter()
        logp, _ = stage.policy_logprobs(stage.record(prompts, rollouts), rows, with_grad=True)
        logp.sum().backward()
        update_s = time.perf_counter() - t0
        sync_s = statistics.median(syncs)
        print(json.dumps({
            "bench": "rollout", "family": args.family, "size": args.size, "group_size": g, "prompts": args.prompts,
            "vllm_dtype": args.vllm_dtype,
            "max_new_tokens": args.max_new_tokens,
            "hf_tokens_per_s": round(hf_tokens / hf_s, 1), "vllm_tokens_per_s": round(vllm_tokens / vllm_s, 1),
            "vllm_over_hf": round((vllm_tokens / vllm_s) / (hf_tokens / hf_s), 2),
            "hf_rollout_s": round(hf_s, 3), "vllm_rollout_s": round(vllm_s, 3), "sync_s": round(sync_s, 4),
            "sync_share_of_step": round(sync_s / (vllm_s + sync_s + update_s), 4),
        }), flush=True)


if __name__ == "__main__":
    main()
