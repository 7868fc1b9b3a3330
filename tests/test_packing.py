"""The padding-free (packed) forwards (r1v3.rl.packing) give the padded computation's log-probs,
loss and gradients: rows of different lengths, with the shared prompt pass and without it (whole
rows, as SFT and the per-row path run), in fp32, under bf16 autocast and with activation
checkpointing."""

import contextlib

import pytest
import torch

from r1v3.rl import packing, prefix
from test_prefix import TOLERANCE, load, loss_and_grads


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, real_dirs):
    return tiny_dirs | real_dirs


def compare(packed, padded, tol):
    assert (packed[0] - padded[0]).abs().max() <= tol["logp"] * padded[0].abs().max()
    assert abs(float(packed[1] - padded[1])) <= tol["logp"] * max(abs(float(padded[1])), 1e-3)
    assert packed[2].keys() == padded[2].keys()
    total = torch.cat([g.flatten() for g in padded[2].values()])
    error = torch.cat([(packed[2][n] - g).flatten() for n, g in padded[2].items()])
    assert error.norm() <= tol["grad"] * total.norm(), float(error.norm() / total.norm())


def completions(tokenizer, n, width, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (n, width), generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = tokenizer.pad_token_id
    return ids, mask, torch.randn(n, generator=gen)


@pytest.mark.parametrize("family, precision, checkpointing", [
    ("internvl", "fp32", False), ("qwen2_5_vl_dynamic", "fp32", False), ("llava", "fp32", False),
    ("internvl_tiled", "bf16", False), ("qwen3_vl_moe", "fp32", True), ("internvl", "fp32", True)])
def test_packed_shared_pass_matches_padded(model_dirs, synth_dir, family, precision, checkpointing):
    backbone, encoder, prompts = load(model_dirs, synth_dir, family)
    model = backbone.model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert packing.enable(model)
    G = 3
    rows = torch.tensor([4, 0, 2, 5, 3])
    owners = (rows // G).tolist()
    ids, mask, advantages = completions(backbone.tokenizer, len(rows), 11, [11, 6, 1, 3, 9])
    unique = sorted(set(owners))
    tokens, images = encoder.encode_prompts([prompts[p].text for p in unique], [prompts[p].images for p in unique])
    index = torch.tensor([unique.index(p) for p in owners])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    seen = []
    first_layer = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0"))
    hook = first_layer.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    with autocast:
        logits = prefix.completion_logits(model, tokens, images, index, ids, mask)
    packed = loss_and_grads(model, logits, ids, mask, advantages)
    hook.remove()
    assert (1, int(mask[:, :-1].sum())) in seen  # the completions ran as one row of real tokens
    with autocast, packing.disabled(model):
        logits = prefix.completion_logits(model, tokens, images, index, ids, mask)
    padded = loss_and_grads(model, logits, ids, mask, advantages)
    compare(packed, padded, TOLERANCE[precision])


def sft_loss_and_grads(stage, batch):
    stage.model.zero_grad()
    loss = stage.supervised_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, chunk", [("internvl", 0), ("qwen2_5_vl", 0), ("qwen3_vl", 0), ("llava", 0),
                                           ("internvl_tiled", 128)])
def test_packed_sft_loss_matches_padded(model_dirs, synth_dir, family, chunk):
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.stages.sft import SFTStage

    stage = SFTStage(str(model_dirs[family]), val_generate=False, logits_chunk=chunk)
    stage.configure_model()
    assert packing.enabled(stage.model)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=6)
    data.processor, data.collate_mode = stage.processor, "sft"
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    lengths = batch["inputs"]["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "rows of different lengths"
    seen = []
    first_layer = next(m for n, m in stage.model.named_modules() if n.endswith("language_model.layers.0"))
    hook = first_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    packed_loss, packed_grads = sft_loss_and_grads(stage, batch)
    with packing.disabled(stage.model):
        padded_loss, padded_grads = sft_loss_and_grads(stage, batch)
    hook.remove()
    assert seen == [(1, int(lengths.sum())), tuple(batch["inputs"]["input_ids"].shape)]  # one packed row, no padding
    compare((torch.zeros(1), packed_loss, packed_grads), (torch.zeros(1), padded_loss, padded_grads),
            TOLERANCE["fp32"])


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl_dynamic"])
def test_packed_whole_rows_match_padded(model_dirs, synth_dir, family):
    """Where rows cannot share a prompt pass (FSDP1), each row runs whole: prompt and completion."""
    backbone, encoder, prompts = load(model_dirs, synth_dir, family)
    model = backbone.model.train()
    assert packing.enable(model)
    owners = [0, 0, 1, 1]
    ids, mask, advantages = completions(backbone.tokenizer, len(owners), 8, [8, 2, 5, 7], seed=1)
    tokens, images = encoder.encode_prompts([prompts[p].text for p in owners], [prompts[p].images for p in owners])
    pad = backbone.tokenizer.pad_token_id
    packed = loss_and_grads(model, prefix.per_row_completion_logits(model, tokens, images, ids, mask, pad), ids, mask,
                            advantages)
    with packing.disabled(model):
        padded = loss_and_grads(model, prefix.per_row_completion_logits(model, tokens, images, ids, mask, pad), ids,
                                mask, advantages)
    compare(packed, padded, TOLERANCE["fp32"])


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_layers_match_eager_and_compile_once(model_dirs, synth_dir):
    """``load.compile``: the compiled packed pass gives the eager one's log-probs and gradients, and
    20 passes of different lengths and prompts, with gradients and without, compile a bounded number
    of graphs (one per grad mode) while the eager prompt pass and generation compile none."""
    torch._dynamo.reset()
    backbone, encoder, prompts = load(model_dirs, synth_dir, "internvl", n_prompts=4)
    model = backbone.model.train()
    assert packing.enable(model) and packing.compile_layers(model) == 2
    G, gen = 3, torch.Generator().manual_seed(0)
    before = graphs()
    for step in range(20):
        n_prompts = 1 + step % 4
        index = torch.arange(n_prompts).repeat_interleave(G)
        lengths = torch.randint(1, 13, (len(index),), generator=gen).tolist()
        ids, mask, advantages = completions(backbone.tokenizer, len(index), 12, lengths, seed=step)
        sub, sub_images = encoder.encode_prompts([p.text for p in prompts[:n_prompts]],
                                                 [p.images for p in prompts[:n_prompts]])
        if step % 5 == 4:
            with torch.no_grad():
                prefix.completion_logits(model, sub, sub_images, index, ids, mask)
            continue
        logits = prefix.completion_logits(model, sub, sub_images, index, ids, mask)
        compiled = loss_and_grads(model, logits, ids, mask, advantages)
        if step in (0, 13):
            with packing.disabled(model):  # the padded, eager pass
                eager = loss_and_grads(model, prefix.completion_logits(model, sub, sub_images, index, ids, mask), ids,
                                       mask, advantages)
            compare(compiled, eager, TOLERANCE["fp32"])
    assert 1 <= graphs() - before <= 2, graphs() - before  # compiled at all, and not once per length
    # Under bf16 autocast (its own graph): within the bound of the padded eager pass in test_prefix.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prefix.completion_logits(model, sub, sub_images, index, ids, mask)
    compiled = loss_and_grads(model, logits, ids, mask, advantages)
    with torch.autocast("cpu", dtype=torch.bfloat16), packing.disabled(model):
        logits = prefix.completion_logits(model, sub, sub_images, index, ids, mask)
    compare(compiled, loss_and_grads(model, logits, ids, mask, advantages), TOLERANCE["bf16"])


def test_compiled_sft_run_compiles_once(tiny_dirs, synth_dir):
    """A 20-step SFT fit with ``load.compile``: batches of different lengths, one graph, and the loss
    falls as it does eager."""
    from lightning.pytorch import Trainer

    from r1v3.backbone import LoadConfig
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage

    torch._dynamo.reset()
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False, load=LoadConfig(compile=True),
                     optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant"))
    losses, widths = [], set()
    stage.on_train_batch_end = lambda out, batch, *_: (losses.append(float(out["loss"])),
                                                       widths.add(int(batch["inputs"]["attention_mask"].sum())))
    before = graphs()
    Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(
        stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=4))
    assert len(losses) == 20 and len(widths) > 5, widths  # packed lengths differ from step to step
    assert 1 <= graphs() - before <= 2
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


@pytest.mark.gpu
def test_packed_flash_attention_matches_padded(model_dirs, synth_dir, monkeypatch):
    """On GPU with flash-attn 2, packed rows go through flash-attn's varlen kernel (r1v3_packed_flash):
    the same log-probs and gradients as padded flash attention, with the shared prompt pass and with
    whole rows, within the bf16 bounds (the kernel computes in half precision)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: flash-attn's varlen kernel runs only there")
    pytest.importorskip("flash_attn", reason="needs flash-attn 2 (pip install flash-attn)")
    from r1v3 import backbone as bb

    load_backbone = bb.load_backbone
    monkeypatch.setattr(bb, "load_backbone", lambda path, **kw: load_backbone(
        path, dtype="bfloat16", attn_implementation="flash_attention_2", device="cuda"))
    backbone, encoder, prompts = load(model_dirs, synth_dir, "qwen2_5_vl")
    model = backbone.model.cuda().train()
    assert packing.enable(model) and packing.language_config(model)._attn_implementation == packing.PACKED_FLASH
    owners = [0, 0, 1, 1, 1]
    ids, mask, advantages = completions(backbone.tokenizer, len(owners), 9, [9, 3, 1, 6, 8])
    ids, mask, advantages = ids.cuda(), mask.cuda(), advantages.cuda()
    tokens, images = encoder.encode_prompts([prompts[p].text for p in (0, 1)], [prompts[p].images for p in (0, 1)])
    tokens, images = ({k: v.cuda() for k, v in d.items()} for d in (tokens, images))
    index = torch.tensor(owners, device="cuda")
    packed = loss_and_grads(model, prefix.completion_logits(model, tokens, images, index, ids, mask), ids, mask,
                            advantages)
    with packing.disabled(model):
        padded = loss_and_grads(model, prefix.completion_logits(model, tokens, images, index, ids, mask), ids, mask,
                                advantages)
    compare(packed, padded, TOLERANCE["bf16"])
    rows, rows_images = encoder.encode_prompts([prompts[p].text for p in owners], [prompts[p].images for p in owners])
    rows, rows_images = ({k: v.cuda() for k, v in d.items()} for d in (rows, rows_images))
    pad = backbone.tokenizer.pad_token_id
    packed = loss_and_grads(model, prefix.per_row_completion_logits(model, rows, rows_images, ids, mask, pad), ids,
                            mask, advantages)
    with packing.disabled(model):
        padded = loss_and_grads(model, prefix.per_row_completion_logits(model, rows, rows_images, ids, mask, pad),
                                ids, mask, advantages)
    compare(packed, padded, TOLERANCE["bf16"])
