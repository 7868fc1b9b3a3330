"""The agreement check's measured gap: engine vs trainer prompt log-probs, per precision pairing.

    <vllm venv>/bin/python bench/engine_agreement.py

Runs in the vLLM environment (.ci/setup_vllm.sh). For each family, a tiny model, three prompts
whose images have different sizes, and each pairing of engine dtype (float32, bfloat16) with
trainer precision (fp32, bf16 autocast): the mean |log-prob difference| per prompt token that
``r1v3.rl.engines.check_engine_agreement`` measures. One JSON line; the figures are in docs/vllm.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="internvl,qwen2_5_vl")
    parser.add_argument("--engine-dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from r1v3.chat import render_prompt
    from r1v3.rl.engines import build_engine, check_engine_agreement
    from r1v3.rl.rollout import Prompt
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-agreement-"))
    gaps = {}
    for family in args.families.split(","):
        model_dir = build_tiny(family, workdir / family)
        stage = GRPOStage(str(model_dir))
        stage.setup("fit")
        stage.configure_model()
        prompts = [Prompt(render_prompt(stage.processor, "<image>\nHow many red shapes are there?", 1),
                          [Image.new("RGB", size, colour)])
                   for size, colour in (((128, 64), "red"), ((192, 192), "blue"), ((64, 64), "green"))]
        encoded = stage.encoder.encode_each([p.text for p in prompts], [p.images for p in prompts])
        for dtype in args.engine_dtypes.split(","):
            engine = build_engine("vllm", model_dir=str(model_dir), model=None, encoder=stage.encoder,
                                  tokenizer=stage.tokenizer, family=stage.backbone.family,
                                  vllm_config=VLLMConfig(max_model_len=1024, dtype=dtype, max_prompt_logprob_gap=1e9),
                                  suppress_tokens=stage.placeholder_ids)
            for trainer in ("fp32", "bf16-mixed"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer == "bf16-mixed"):
                    gap = check_engine_agreement(engine, stage.model, prompts, encoded, ["a", "b", "c"],
                                                 stage.placeholder_ids, stage.encoder.image_kwargs, "cpu")
                gaps[f"{family}/engine_{dtype}/trainer_{trainer}"] = float(f"{gap:.3g}")
            del engine
            gc.collect()  # one engine at a time (vLLM's process-wide state)
    print(json.dumps({"mean_prompt_logprob_gap": gaps}))


if __name__ == "__main__":
    main()
