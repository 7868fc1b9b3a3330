"""LoRA policies on the embedded vLLM engine (the vLLM tier): after an update the engine samples
what the trainer's adapted policy does, through vLLM's own LoRA path (the adapter alone) for the
families whose adapters load on this CPU, and through merged weights for the mixture-of-experts
families, whose vLLM LoRA kernels need Triton (docs/lora.md)."""

import pytest
import torch

from test_vllm import collect_engines, greedy, prompts_for, train_a_little  # noqa: F401  (autouse fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("need_vllm")]

ADAPTER_PATH = ("internvl", "internvl3_5", "qwen2_5_vl", "llava", "qwen3_vl")
MERGED_PATH = ("qwen3_vl_moe", "internvl3_5_moe")


def build_pair(family, model_dir, lora):
    from r1v3 import backbone as bb
    from r1v3.rl.engines import engine_adapter_rank
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine, vllm_name_mapper
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(model_dir), trainable=["connector"], lora=lora)
    stage.setup("fit")
    stage.configure_model()
    engine = VLLMEngine(str(model_dir), VLLMConfig(max_model_len=512), seed=0,
                        rename=vllm_name_mapper(stage.backbone.family), group_of=stage.backbone.group_of,
                        suppress_tokens=bb.multimodal_token_ids(stage.processor),
                        adapter_rank=engine_adapter_rank(stage.lora, stage.model))
    return stage, engine


@pytest.mark.parametrize("family", ADAPTER_PATH + MERGED_PATH)
def test_greedy_parity_after_a_lora_update(family, tiny_dirs):
    from r1v3.lora import LoraConfig

    # the head adapted too: vLLM 0.32 adapts no head, so it travels merged beside the adapter
    lora = LoraConfig(groups=["llm"], r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    stage, engine = build_pair(family, tiny_dirs[family], lora)
    prompts = prompts_for(stage.processor)
    start = greedy(engine, prompts)
    assert start == greedy(stage.engine, prompts), "parity before training"
    train_a_little(stage, prompts, lr=3e-2)
    trained = greedy(stage.engine, prompts)
    assert trained != start, "the update changed the policy's greedy answers"
    stats = engine.sync_weights(stage.model, stage.trainable)
    head = sum(1 for n, _ in stage.model.named_parameters() if n.startswith("lm_head.base_layer."))
    connector = len(stage.backbone.group_parameters()["connector"])
    if family in ADAPTER_PATH:
        # the connector and the merged head as tensors; q/v/down adapters as a few kB of adapter
        assert engine.lora_request is not None and 0 < stats["adapter_mb"] < 1
        assert stats["tensors"] == connector + head
    else:
        # every block holding an adapted weight goes whole, merged
        assert engine.lora_request is None and stats["adapter_mb"] == 0
        assert stats["tensors"] > connector + head
    assert greedy(engine, prompts) == trained, "parity after the sync"


def test_lora_grpo_on_the_vllm_engine_sends_the_adapter_each_step(tiny_dirs, synth_dir):
    from lightning.pytorch import Trainer
    from test_grpo_variants import Curves

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.lora import LoraConfig
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(tiny_dirs["qwen2_5_vl"]), trainable=["connector"], lora=LoraConfig(groups=["llm"], r=8),
                      rollout="vllm", vllm=VLLMConfig(max_model_len=512), sampling=SamplingConfig(n=4, max_new_tokens=12),
                      reward_fn="test_vllm.length_reward", rollout_log_every=0, kl_coef=0.05,
                      optimizer=OptimizerConfig(lr=3e-2, warmup_ratio=0.0, schedule="constant"))
    rows = Curves()
    Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, callbacks=[rows]).fit(
        stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    connector = len(stage.backbone.group_parameters()["connector"])
    first, *updates = rows.rows
    assert first["train/sync_tensors"] > connector, "the first entry pushes every tensor"
    for row in updates:  # after each update: the connector as tensors, the llm as its adapter
        assert row["train/sync_tensors"] == connector and 0 < row["train/sync_adapter_mb"] < row["train/sync_mb"]
        # the engine sampled from the adapted policy: the trainer scores its tokens alike
        assert row["train/logprob_gap"] < 1e-3
    assert stage.session.pushes == 4 and stage.engine.lora_request is not None  # 3 rollouts + the end of fit
    assert stage.reference is None and all(row["train/kl_ref"] >= 0 for row in rows.rows)


def test_a_rollback_pushes_the_restored_policy_whole_and_the_engine_agrees(tiny_dirs, synth_dir, tmp_path):
    from lightning.pytorch import Callback, Trainer
    from test_grpo_variants import Curves

    from r1v3.callbacks import RankedCheckpoint, Rollback
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.lora import LoraConfig
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    class AlarmAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                pl_module.publish_alarm("kl", "scripted")

    stage = GRPOStage(str(tiny_dirs["qwen2_5_vl"]), trainable=["connector"], lora=LoraConfig(groups=["llm"], r=8),
                      rollout="vllm", vllm=VLLMConfig(max_model_len=512), sampling=SamplingConfig(n=4, max_new_tokens=12),
                      reward_fn="test_vllm.length_reward", rollout_log_every=0,
                      optimizer=OptimizerConfig(lr=3e-2, warmup_ratio=0.0, schedule="constant"))
    rows = Curves()
    rollback = Rollback(on=["kl"], onset_steps=1)
    Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, log_every_n_steps=1, callbacks=[rows, AlarmAt(), rollback, RankedCheckpoint(
                dirpath=tmp_path, save_top_k=0, keep_healthy=1, healthy_every_n_steps=2)]).fit(
        stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert [(r["step"], r["restored_step"]) for r in rollback.rollbacks] == [(4, 2)]
    connector = len(stage.backbone.group_parameters()["connector"])
    before, after = rows.rows[3], rows.rows[4]  # steps 4 and 5: the rollout after the rollback
    assert before["train/sync_tensors"] == connector  # an ordinary step: connector + adapter
    assert after["train/sync_tensors"] > connector, "every tensor of the restored policy is pushed"
    assert "train/engine_prompt_logprob_gap" in after, "the engine is checked against the trainer again"
    # the engine sampled from the restored weights: the trainer scores the tokens alike
    assert after["train/logprob_gap"] < 1e-3 and after["train/engine_prompt_logprob_gap"] < 1e-3
