"""Cold-start data by rejection sampling, as Skywork-R1V3 built its SFT set (arXiv 2507.06167, §3.1):
sample k responses per question, keep those the reward verifies as correct and well-formed, and
write them as SFT shards whose ``trace`` is the response's reasoning.

    r1v3 rejection-sample --model runs/demo/sft/hf --shards runs/demo/data/train --out data/rs/rs-%06d.tar
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1v3.chat import parse_response, render_prompt


def rejection_sample(model: str, shards: str, out: str, k: int = 4, temperature: float = 1.0,
                     max_new_tokens: int = 256, batch_size: int = 8, engine: str = "hf", seed: int = 0,
                     reward_fn: str = "r1v3.rewards.R1V3Reward", reward_kwargs: dict | None = None,
                     limit: int | None = None, maxcount: int = 1000) -> dict:
    from r1v3 import backbone as bb
    from r1v3.data_modules.shards import write_shards
    from r1v3.data_modules.webdata import ShardStream, load_sources
    from r1v3.encoding import PromptEncoder
    from r1v3.rewards import load_reward
    from r1v3.rl.engines import EngineSession, build_engine
    from r1v3.rl.rollout import Prompt, SamplingConfig

    backbone = bb.load_backbone(model)
    encoder = PromptEncoder(backbone.processor, family=backbone.family)  # the image settings, as the stages pick them
    rollout = build_engine(engine, model_dir=model, model=backbone.model, encoder=encoder,
                           tokenizer=backbone.tokenizer, seed=seed, family=backbone.family,
                           suppress_tokens=bb.multimodal_token_ids(backbone.processor))
    session = EngineSession(rollout, lambda: (backbone.model, ()), stale=False)
    reward = load_reward(reward_fn, reward_kwargs)
    sampling = SamplingConfig(n=k, temperature=temperature, max_new_tokens=max_new_tokens)
    stream = ShardStream(load_sources(shards), batch_size=batch_size, shuffle=False, drop_last=False)
    report = {"questions": 0, "responses": 0, "kept": 0, "skipped_bad_samples": 0, "per_question": {}}

    def kept_samples():
        for step, batch in enumerate(stream):
            report["skipped_bad_samples"] += sum(batch["skipped"].values())
            samples = batch["samples"][: None if limit is None else max(limit - report["questions"], 0)]
            if not samples:
                continue
            prompts = [Prompt(render_prompt(backbone.processor, s["question"], len(s["images"]),
                                            options=s.get("options")), s["images"]) for s in samples]
            with session as awake:
                rollouts = awake.generate(prompts, sampling, seed=seed + step)
            scores = reward([{"question": samples[i // k]["question"], "answer": samples[i // k]["answer"],
                              "options": samples[i // k].get("options"), "response": text}
                             for i, text in enumerate(rollouts.texts)])
            for q, sample in enumerate(samples):
                kept = 0
                for j in range(k):
                    i = q * k + j
                    if not (scores[i].get("accuracy") == 1 and scores[i].get("format") == 1):
                        continue
                    kept += 1
                    record = {key: sample.get(key) for key in ("question", "answer", "options", "subject",
                                                               "difficulty")}
                    yield dict(record, id=f"{sample['id']}_rs{j}", images=sample["images"], source="rejection",
                               trace=parse_response(rollouts.texts[i]).think.strip(),
                               response=rollouts.texts[i])
                report["per_question"][sample["id"]] = kept / k
                report["kept"] += kept
            report["questions"] += len(samples)
            report["responses"] += len(rollouts.texts)

    stats = write_shards(kept_samples(), out, maxcount=maxcount)
    report["shards"] = stats["shards"]
    report["yield"] = report["kept"] / max(report["responses"], 1)
    close = getattr(reward, "close", None)
    if close:
        close()
    return report


def rejection_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 rejection-sample", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--shards", required=True, help="question shards (dir, glob or brace pattern)")
    parser.add_argument("--out", required=True, help="output shard pattern, e.g. out/rs-%%06d.tar")
    parser.add_argument("--k", type=int, default=4, help="responses per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=None, help="write the JSON report here too")
    args = parser.parse_args(argv)
    try:
        report = rejection_sample(args.model, args.shards, args.out, k=args.k, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  engine=args.engine, seed=args.seed, limit=args.limit)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"r1v3 rejection-sample: error: {err}", file=sys.stderr)
        return 2
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "per_question"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(rejection_main())
