"""Correctness under the speed-ups: one shared prompt pass per GRPO group (r1v3.rl.prefix) gives
the log-probs, loss and gradients of running every row whole, in fp32 and under bf16 autocast
(Lightning's ``bf16-mixed``), and the rollout engine's shared prefill generates what plain
``generate`` does."""

import contextlib

import pytest
import torch

from r1v3 import backbone as bb
from r1v3.data_modules.webdata import WebDataModule
from r1v3.encoding import PromptEncoder
from r1v3.logprobs import gather_logprobs, sampling_logits
from r1v3.rl import prefix
from r1v3.rl.losses import policy_loss
from r1v3.rl.rollout import HFGenerateEngine, Prompt, SamplingConfig

FAMILIES = ("internvl", "internvl3_5", "internvl3_5_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava")
REAL = ("internvl_tiled", "qwen2_5_vl_dynamic")  # conftest.real_dirs
# Tolerances fixed before the first run: fp32 reorders sums only; bf16 rounds every matmul input
# to 8 bits of mantissa on both sides, in a different batch layout.
TOLERANCE = {"fp32": dict(logp=1e-5, grad=1e-4), "bf16": dict(logp=5e-2, grad=5e-2)}


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, real_dirs):
    return tiny_dirs | real_dirs


def load(model_dirs, synth_dir, name, n_prompts=2):
    backbone = bb.load_backbone(model_dirs[name])
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=n_prompts)
    data.processor = backbone.processor
    data.collate_mode = "prompt"
    data.setup("fit")
    meta = next(iter(data.train_dataloader()))["meta"]
    images = meta["pil_images"]
    if name in REAL:  # sizes that tile (2-3 crops + a thumbnail) or resize to different token counts
        images = [[image.resize((128 + 32 * i, 64)) for image in imgs] for i, imgs in enumerate(images)]
    prompts = [Prompt(t, i) for t, i in zip(meta["prompt_text"], images)]
    encoder = PromptEncoder(backbone.processor, family=backbone.family)
    if name in REAL:
        ids = encoder.encode_each([prompts[0].text], [prompts[0].images]).tokens[0]["input_ids"]
        assert (ids == backbone.model.config.image_token_id).sum() > 16, "more image tokens than one 64-px tile"
    return backbone, encoder, prompts


def loss_and_grads(model, logits, ids, mask, advantages):
    logp = gather_logprobs(logits.float(), ids)
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask.float(), 0.2, 0.2, "seq-mean-token-mean")
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach() * mask, loss.detach(), grads


# MoE under bf16: rounding that differs between the two batch layouts can flip a token's top-k
# experts, a discrete jump no tolerance bounds; exactness is asserted in fp32 only (docs/models.md).
MOE_BF16 = pytest.mark.skip(reason="top-k routing can flip under bf16 rounding; MoE exactness is bounded in fp32")


# Activation checkpointing replays every layer in the backward; one dense, one M-RoPE and one MoE
# family cover the cache's replay paths (the FSDP2 test in tests/test_fsdp.py runs it sharded).
CHECKPOINTED = ("internvl", "qwen2_5_vl_dynamic", "qwen3_vl_moe")


@pytest.mark.parametrize("family, precision, checkpointing", [
    pytest.param(f, p, False, marks=MOE_BF16 if p == "bf16" and f.endswith("_moe") else ())
    for f in FAMILIES + REAL for p in ("fp32", "bf16")] + [(f, "fp32", True) for f in CHECKPOINTED])
def test_shared_prompt_pass_matches_per_row(model_dirs, synth_dir, family, precision, checkpointing):
    backbone, encoder, prompts = load(model_dirs, synth_dir, family)
    model, G, T = backbone.model.train(), 3, 9
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert prefix.shares_prompts(model)
    gen = torch.Generator().manual_seed(0)
    # A subset of rows, out of order, one group split: what a micro-batch can hold.
    rows = torch.tensor([4, 0, 2, 5, 3])
    owners = (rows // G).tolist()
    ids = torch.randint(10, 200, (len(rows), T), generator=gen)
    mask = torch.ones(len(rows), T, dtype=torch.long)
    mask[1, 5:] = 0  # EOS early: right padding follows
    mask[3, 2:] = 0
    ids[mask == 0] = backbone.tokenizer.pad_token_id
    advantages = torch.randn(len(rows), generator=gen)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    unique = sorted(set(owners))
    tokens, images = encoder.encode_prompts([prompts[p].text for p in unique], [prompts[p].images for p in unique])
    index = torch.tensor([unique.index(p) for p in owners])
    with autocast:
        logits = prefix.completion_logits(model, tokens, images, index, ids, mask)
    shared = loss_and_grads(model, logits, ids, mask, advantages)

    tokens, images = encoder.encode_prompts([prompts[p].text for p in owners], [prompts[p].images for p in owners])
    with autocast:
        logits = prefix.per_row_completion_logits(model, tokens, images, ids, mask, backbone.tokenizer.pad_token_id)
    reference = loss_and_grads(model, logits, ids, mask, advantages)

    tol = TOLERANCE[precision]
    assert (shared[0] - reference[0]).abs().max() <= tol["logp"] * reference[0].abs().max()
    assert abs(float(shared[1] - reference[1])) <= tol["logp"] * max(abs(float(reference[1])), 1e-3)
    assert shared[2].keys() == reference[2].keys()
    vision = [n for n in reference[2] if backbone.group_of(n) == "vision"]
    assert vision and all(reference[2][n].abs().sum() > 0 for n in vision[:3]), "gradient reaches the image side"
    total = torch.cat([g.flatten() for g in reference[2].values()])
    error = torch.cat([(shared[2][n] - g).flatten() for n, g in reference[2].items()])
    assert error.norm() <= tol["grad"] * total.norm(), float(error.norm() / total.norm())


@pytest.mark.parametrize("family", FAMILIES + REAL)
def test_shared_prefill_generates_what_plain_generate_does(model_dirs, synth_dir, family):
    backbone, encoder, prompts = load(model_dirs, synth_dir, family)
    model, tokenizer = backbone.model, backbone.tokenizer
    suppress = bb.multimodal_token_ids(backbone.processor)
    engine = HFGenerateEngine(model, encoder, tokenizer, suppress_tokens=suppress)
    rollouts = engine.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=12))

    rows = [p for p in prompts for _ in range(2)]
    tokens, images = encoder.encode_prompts([p.text for p in rows], [p.images for p in rows])
    with torch.no_grad():
        out = model.eval().generate(**tokens, **images, do_sample=False, max_new_tokens=12, suppress_tokens=suppress,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    return_dict_in_generate=True, output_logits=True)
    plain = out.sequences[:, tokens["input_ids"].shape[1]:]
    mask = rollouts.completion_mask
    width = mask.shape[1]
    assert torch.equal(plain[:, :width] * mask, rollouts.completion_ids * mask)
    plain_logp = torch.stack([torch.log_softmax(sampling_logits(step, 1.0, suppress), -1)
                              .gather(1, plain[:, t:t + 1]).squeeze(1) for t, step in enumerate(out.logits)], 1)[:, :width]
    assert ((plain_logp - rollouts.logprobs).abs() * mask).max() < 1e-5
