"""The trainer's update beside an in-process vLLM engine: its torch thread count and its speed.

    <vllm venv>/bin/python bench/engine_threads.py --size small --repeats 5

Runs in the vLLM environment (.ci/setup_vllm.sh). vLLM's CPU worker sets torch to one thread and
replaces ``torch.set_num_threads`` with a no-op; the engine gives the trainer its count back. This
times the GRPO update's compute (the policy's forward and backward over one step's rollouts) three
ways: before any engine exists, after the engine started (r1v3 as shipped), and after it with torch
held at the one thread vLLM leaves (what ran before the fix). One JSON line: medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    from r1v3.chat import render_prompt
    from r1v3.data_modules.synthetic import generate
    from r1v3.rl.rollout import Prompt, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-threads-"))
    model_dir = work / f"internvl-{args.size}"
    if not (model_dir / "config.json").exists():
        build_tiny("internvl", model_dir, size=args.size)
    stage = GRPOStage(str(model_dir), rollout_log_every=0)
    stage.setup("fit")
    stage.configure_model()
    samples = list(generate(args.prompts, ("count", "add_digits"), seed=0))
    prompts = [Prompt(render_prompt(stage.processor, s["question"], 1), s["images"]) for s in samples]
    rollouts = stage.engine.generate(prompts, SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                                     seed=0)
    record = stage.record(prompts, rollouts)
    rows = torch.arange(rollouts.completion_ids.shape[0])

    def update_s() -> float:
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            stage.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logp, _ = stage.policy_logprobs(record, rows, with_grad=True)
            logp.sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    threads = torch.get_num_threads()
    before = update_s()
    VLLMEngine(str(model_dir), VLLMConfig(max_model_len=1024))
    after = update_s()
    threads_after = torch.get_num_threads()
    torch.set_num_threads(1)  # what the engine left behind before r1v3 restored it
    one_thread = update_s()
    torch.set_num_threads(threads)
    print(json.dumps({
        "bench": "engine_threads", "size": args.size, "group_size": args.group_size, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "threads_before_engine": threads,
        "threads_after_engine": threads_after, "update_s_before_engine": round(before, 3),
        "update_s_after_engine": round(after, 3), "update_s_one_thread": round(one_thread, 3),
        "after_over_before": round(after / before, 3), "one_thread_over_after": round(one_thread / after, 3),
    }), flush=True)


if __name__ == "__main__":
    main()
