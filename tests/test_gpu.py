"""GPU smoke test of the engine lifecycle that only a GPU exercises: vLLM's sleep mode.

On CPU the engine never sleeps, so the order wake → sync → generate → sleep is checked there with a
recording engine (tests/test_engines.py). Here the real engine sleeps at level 1 during the updates
(its weights offloaded, its KV cache freed) and wakes for rollouts, and weights are pushed only
while it is awake: after a few GRPO steps its greedy output must equal the HF policy's.
Run with ``pytest -m gpu`` on a machine with CUDA and vLLM.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def need_gpu_vllm():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: vLLM's sleep mode exists only there")
    from r1v3.rl.vllm_engine import vllm_available

    if not vllm_available():
        pytest.skip("needs vLLM (pip install 'r1v3[vllm]')")


def length_reward(items):
    return [{"reward": min(len(it["response"]) / 40.0, 1.0)} for it in items]


def test_sleep_mode_grpo_keeps_greedy_parity(need_gpu_vllm, tiny_dirs, synth_dir):
    from lightning.pytorch import Trainer
    from PIL import Image

    from r1v3.backbone import multimodal_token_ids
    from r1v3.chat import render_prompt
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import HFGenerateEngine, Prompt, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(tiny_dirs["qwen2_5_vl"]), rollout="vllm",
                      vllm=VLLMConfig(max_model_len=512, sleep_mode=True, gpu_memory_utilization=0.3,
                                      dtype="float32", enforce_eager=True),
                      sampling=SamplingConfig(n=4, max_new_tokens=12), reward_fn="test_gpu.length_reward",
                      rollout_log_every=0, optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant"))
    trainer = Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                      val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), val=str(synth_dir / "val"),
                                                batch_size=2))
    assert isinstance(stage.engine, VLLMEngine) and trainer.global_step == 3
    assert float(trainer.callback_metrics["train/logprob_gap"]) < 1e-2  # step 3 sampled the pushed weights
    prompts = [Prompt(render_prompt(stage.processor, "<image>\nHow many red shapes are there?", 1),
                      [Image.new("RGB", (64, 64), colour)]) for colour in ("red", "blue")]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    hf = HFGenerateEngine(stage.model, stage.encoder, stage.tokenizer,
                          suppress_tokens=multimodal_token_ids(stage.processor))
    with stage.session as engine:  # fit ended with the final update pushed; the engine wakes for this
        from_vllm = engine.generate(prompts, greedy)
    expected = hf.generate(prompts, greedy)
    assert from_vllm.texts == expected.texts
