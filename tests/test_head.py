"""Chunked log-probs (r1v3/rl/head.py): the head applied a few positions at a time, after a
padding-free pass, gives the log-probs, entropies and gradients of the whole logits of a padded
one, through both ways a micro-batch is scored (one shared prompt pass per group, or every row
whole), on a 151k-token vocabulary and with a LoRA-adapted head."""

import pytest
import torch

from r1v3.lora import LoraConfig
from r1v3.rl import packing, prefix, scoring
from r1v3.rl.rollout import Prompt, SamplingConfig
from r1v3.stages.grpo import GRPOStage


def score(stage, step, rows, chunk, bf16=False):
    stage.model.r1v3_logits_chunk = chunk
    stage.model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp, entropy = scoring.completion_logprobs(stage.model, step, rows, 0.7, stage.device, with_entropy=True,
                                                    entropy_grad=True)
    mask = step.rollouts.completion_mask[rows]
    # a loss through both outputs, so the backward runs through every chunk's recomputed logits
    ((logp * torch.linspace(-1, 1, len(rows))[:, None]).sum() + 0.1 * (entropy * mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.grad is not None}
    return logp.detach(), (entropy * mask).detach(), grads


# A plain head runs the fused loop (one autograd node), the LoRA-wrapped one a checkpoint per chunk.
# Tolerances as tests/test_prefix.py's: fp32 reorders sums only; bf16 rounds both sides' matmuls.
@pytest.mark.parametrize("name, shared, lora, bf16", [
    ("internvl", True, False, False), ("internvl", False, False, False), ("internvl_tiled", True, False, False),
    ("qwen2_5_vl", True, True, False), ("internvl", True, False, True)])
def test_chunked_logprobs_equal_the_whole_logits(name, shared, lora, bf16, tiny_dirs, real_dirs, synth_dir,
                                                 monkeypatch):
    from r1v3.data_modules.webdata import WebDataModule

    model_dir = (tiny_dirs | real_dirs)[name]
    adapters = LoraConfig(groups=["llm"], r=4, target_modules=["q_proj", "lm_head"]) if lora else LoraConfig()
    stage = GRPOStage(str(model_dir), sampling=SamplingConfig(n=3, max_new_tokens=7), lora=adapters,
                      trainable=["connector"] if lora else ("vision", "connector", "llm"))
    stage.setup("fit")
    stage.configure_model()
    if not shared:
        monkeypatch.setattr(prefix, "shares_prompts", lambda model: False)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=2)
    data.processor, data.collate_mode = stage.processor, "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], meta["pil_images"])]
    torch.manual_seed(0)
    step = stage.record(prompts, stage.engine.generate(prompts, stage.sampling, seed=3))
    rows = torch.tensor([5, 0, 3, 1])
    assert packing.enabled(stage.model)  # the stage's default: chunks of a padding-free pass
    with packing.disabled(stage.model):  # the plain path: padded rows, whole logits
        whole = score(stage, step, rows, 0, bf16)
    chunked = score(stage, step, rows, 5, bf16)  # 4 rows × 7 positions: chunks of 5, the last one short
    tol = 5e-2 if bf16 else 1e-5
    assert step.rollouts.completion_mask[rows].sum() > 5
    assert (chunked[0] - whole[0]).abs().max() <= tol * whole[0].abs().max()
    assert (chunked[1] - whole[1]).abs().max() <= tol * whole[1].abs().max()
    assert chunked[2].keys() == whole[2].keys() and len(whole[2]) > 0
    if lora:
        assert any("lm_head.lora_" in n for n in whole[2]), "the adapted head is trained through the chunks"
    total = torch.cat([g.flatten() for g in whole[2].values()])
    error = torch.cat([(chunked[2][n] - g).flatten() for n, g in whole[2].items()])
    assert error.norm() <= tol * total.norm(), float(error.norm() / total.norm())
    assert stage.model.get_output_embeddings().forward.__func__ is type(stage.model.get_output_embeddings()).forward


def test_chunks_without_gradients_keep_no_graph(tiny_dirs):
    from r1v3.rl.head import head_logprobs

    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 6, 8)
    targets = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        logp, entropy = head_logprobs(hidden, head, targets, 1.0, (3,), chunk=4)
    want = torch.log_softmax(head(hidden).index_fill(-1, torch.tensor([3]), float("-inf")), -1)
    assert not logp.requires_grad and torch.allclose(logp, want.gather(-1, targets[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(entropy, -(want.exp() * want.nan_to_num(neginf=0.0)).sum(-1), atol=1e-5)


@pytest.mark.parametrize("name", ["internvl", "internvl_tiled"])
def test_chunked_sft_loss_equals_the_models_own(name, tiny_dirs, real_dirs, synth_dir):
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.stages.sft import SFTStage

    stage = SFTStage(str((tiny_dirs | real_dirs)[name]), val_generate=False)
    stage.configure_model()
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=3)
    data.processor, data.collate_mode = stage.processor, "sft"
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def loss_and_grads(chunk):
        stage.logits_chunk = chunk
        stage.model.zero_grad()
        loss = stage.supervised_loss(batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in stage.model.parameters() if p.grad is not None])

    (whole, whole_grad), (chunked, chunked_grad) = loss_and_grads(0), loss_and_grads(7)
    assert (batch["labels"] != -100).sum() > 7  # several chunks, the last one short
    assert abs(float(chunked - whole)) <= 1e-5 * float(whole)
    assert (chunked_grad - whole_grad).norm() <= 1e-5 * whole_grad.norm()


def test_chunking_follows_the_vocabulary_unless_set(tiny_dirs, real_dirs):
    from r1v3.stages.sft import SFTStage

    chosen = {}
    for name, setting in (("internvl", None), ("internvl_tiled", None), ("internvl_tiled", 0), ("internvl", 64)):
        stage = SFTStage(str((tiny_dirs | real_dirs)[name]), val_generate=False, logits_chunk=setting)
        stage.configure_model()
        chosen[name, setting] = (stage.logits_chunk, stage.model.r1v3_logits_chunk)
    # a 2k vocabulary keeps whole logits by default, a 151k one is chunked; a setting is kept
    assert chosen == {("internvl", None): (0, 0), ("internvl_tiled", None): (128, 128),
                      ("internvl_tiled", 0): (0, 0), ("internvl", 64): (64, 64)}
