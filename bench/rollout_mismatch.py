"""The rollout engine's sampling distribution against the trainer's, per engine and precision: the
figures behind ``correction.mode: auto`` (docs/algorithms.md#rollout-correction-tis--mis).

    <vllm venv>/bin/python bench/rollout_mismatch.py --model runs/variants/seed0/cold/hf

Runs in the vLLM environment (.ci/setup_vllm.sh). For each engine (HF; vLLM in float32 and in
bfloat16) and each trainer precision (fp32, bf16 autocast), G samples for each of a few synthetic
questions at temperature 1, then the trainer's log-probs of the same tokens, and the metrics every
GRPO step logs (``r1v3.rl.correction.mismatch_metrics``): the k3 mismatch KL, the importance weight
π_trainer/π_engine (mean, max), the share of tokens above the TIS cap and of sequences outside the
MIS bounds. ``--model`` defaults to a fresh tiny InternVL; a trained checkpoint (the demo's SFT
export) has the peaked distributions where bf16 rounding shows. One JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an HF directory (default: a fresh tiny InternVL)")
    parser.add_argument("--engines", default="hf,vllm-float32,vllm-bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch

    from r1v3.chat import render_prompt
    from r1v3.data_modules.synthetic import generate
    from r1v3.rl.correction import mismatch_metrics
    from r1v3.rl.engines import build_engine
    from r1v3.rl.rollout import Prompt, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    model_dir = Path(args.model) if args.model else build_tiny(
        "internvl", Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-mismatch-")) / "internvl")
    stage = GRPOStage(str(model_dir), rollout_log_every=0)
    stage.setup("fit")
    stage.configure_model()
    samples = list(generate(args.prompts, ("count", "add_digits", "colour"), seed=0))
    # every other prompt without its image, so the _image and _text splits both have rows
    prompts = [Prompt(render_prompt(stage.processor, s["question"] if i % 2 == 0 else
                                    s["question"].replace("<image>", "").strip(), 1 - i % 2),
                      s["images"] if i % 2 == 0 else [])
               for i, s in enumerate(samples)]
    sampling = SamplingConfig(n=args.group_size, temperature=1.0, max_new_tokens=args.max_new_tokens)
    figures = {}
    for name in args.engines.split(","):
        kind, _, dtype = name.partition("-")
        engine = build_engine(kind, model_dir=str(model_dir), model=stage.model, encoder=stage.encoder,
                              tokenizer=stage.tokenizer, family=stage.backbone.family,
                              vllm_config=VLLMConfig(max_model_len=1024, dtype=dtype or "float32",
                                                     max_prompt_logprob_gap=1e9),
                              suppress_tokens=stage.placeholder_ids)
        record = None
        for trainer in ("fp32", "bf16-mixed"):
            bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer == "bf16-mixed")
            if record is None or kind == "hf":  # the HF engine generates inside the trainer's autocast
                with bf16:
                    record = stage.record(prompts, engine.generate(prompts, sampling, seed=0))
            rows = torch.arange(record.rollouts.completion_ids.shape[0])
            has_image = torch.tensor([bool(prompts[g].images) for g in record.group_index.tolist()])
            with bf16:
                logp, _ = stage.policy_logprobs(record, rows, with_grad=False, with_entropy=False)
            metrics = mismatch_metrics(logp.float(), record.rollouts.logprobs,
                                       record.rollouts.completion_mask.bool(), has_image)
            figures[f"{name}/trainer_{trainer}"] = {k: float(f"{v:.3g}") for k, v in metrics.items()}
        del engine, record
        gc.collect()  # one vLLM engine at a time (process-wide state)
    print(json.dumps({"bench": "rollout_mismatch", "model": str(model_dir), "prompts": args.prompts,
                      "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                      "figures": figures}), flush=True)


if __name__ == "__main__":
    main()
