"""GRPO with ``rollout: vllm`` under FSDP2 on 2 CPU processes, for tests/test_vllm_fsdp.py (run as a
subprocess in the vLLM venv).

    python tests/vllm_fsdp_driver.py SPEC.json

Lightning's launcher starts rank 1 by re-running this command line. After the fit (whose last step
ended with a sharded update and a weight sync), every rank gathers the full updated weights (a
collective), loads them into a plain HF model and writes ``<out>/rank<r>.json``: greedy tokens of
its own vLLM engine, of that HF model, and of the initial weights, on fixed prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer


def fixed_prompts(processor):
    from PIL import Image

    from r1v3.chat import render_prompt
    from r1v3.rl.rollout import Prompt

    colours = ["red", "blue", "green", "orange"]
    return [Prompt(render_prompt(processor, f"<image>\nWhat colour is shape {i}?", 1),
                   [Image.new("RGB", (64, 64), colours[i % 4])]) for i in range(3)]


def greedy(engine, prompts, n_tokens=12):
    from r1v3.rl.rollout import SamplingConfig

    out = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=n_tokens))
    return [row[: int(m.sum())].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from r1v3 import backbone as bb
    from r1v3 import fsdp
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import HFGenerateEngine, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    torch.manual_seed(0)
    stage = GRPOStage(spec["model"], rollout="vllm", vllm=VLLMConfig(max_model_len=512),
                      sampling=SamplingConfig(n=4, max_new_tokens=8), reward_fn="fsdp_driver.length_reward",
                      rollout_log_every=0,
                      optimizer=OptimizerConfig(lr=spec["lr"], warmup_ratio=0.0, schedule="constant"))
    if spec.get("preconfigure"):  # built before the trainer exists, as tests and the demo do
        stage.configure_model()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=fsdp.FSDP2Strategy(), max_steps=spec["max_steps"],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=spec["train"], batch_size=2))

    # The full updated weights, gathered on every rank (each DTensor.full_tensor is a collective;
    # both ranks walk the parameters in the same order).
    full = {name: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for name, p in stage.model.named_parameters()}
    prompts = fixed_prompts(stage.processor)
    suppress = bb.multimodal_token_ids(stage.processor)
    hf_model = bb.load_backbone(spec["model"]).model.eval()
    hf = HFGenerateEngine(hf_model, stage.encoder, stage.tokenizer, suppress_tokens=suppress)
    initial = greedy(hf, prompts)
    missing, unexpected = hf_model.load_state_dict(full, strict=False)
    assert not unexpected, unexpected
    rank = trainer.global_rank
    record = {"rank": rank, "global_step": trainer.global_step, "sharded": fsdp.is_sharded(stage.model),
              "param_types": sorted({type(p).__name__ for p in stage.model.parameters()}),
              "engine_is_vllm": isinstance(stage.engine, VLLMEngine),
              "sync_tensors": float(trainer.callback_metrics.get("train/sync_tensors", -1)),
              # last step: |trainer − engine| log-probs of its rollouts, before that step's update
              "logprob_gap": float(trainer.callback_metrics.get("train/logprob_gap", -1)),
              "n_params": len(full), "missing": list(missing),
              "vllm": greedy(stage.engine, prompts), "hf_updated": greedy(hf, prompts), "hf_initial": initial}
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
