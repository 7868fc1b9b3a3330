"""Log-probs and entropies from the final hidden states, a chunk of positions at a time, so that
the [N, T, V] logits of a micro-batch never exist at once.

At a real vocabulary (~150k entries) the logits dominate the update's memory: 32 completions of
1,024 tokens are about 20 GB in fp32, several times the activations of a 7B model's layers. Here the
model's forward stops before its output head (:func:`head_bypassed`), the caller gathers the hidden
states of the completion positions, and :func:`head_logprobs` applies the head, the sampling
transform, the log-prob gather and the entropy to ``chunk`` positions at a time. The backward
recomputes each chunk's logits instead of keeping them: the peak is one chunk's [chunk, V] plus the
hidden states, and the price is a second head matmul per position. A plain linear head runs the
loop as one autograd node that adds every chunk's weight gradient into one buffer in place; any
other head (a LoRA-wrapped one) runs each chunk under activation checkpointing, where autograd sums
per-chunk weight gradients. The idea is Liger Kernel's fused linear cross-entropy; the code is ours
(docs/performance.md, "Chunked log-probs").
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from r1v3.logprobs import gather_logprobs, sampling_logits
from r1v3.rl.entropy import entropy_from_logits


def logits_chunk(model: torch.nn.Module) -> int:
    """The chunk size set on the model (``r1v3_logits_chunk``; 0: whole logits)."""
    return int(getattr(model, "r1v3_logits_chunk", 0) or 0)


def _pass_through(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextlib.contextmanager
def head_bypassed(model: torch.nn.Module):
    """Inside, the model's output head returns its input, so ``model(...).logits`` holds the final
    (normed) hidden states [..., H]; yields the head, whose own forward still computes logits."""
    head = model.get_output_embeddings()
    head.forward = _pass_through  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield head
    finally:
        del head.forward


def score_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, banned: Sequence[int],
                 with_entropy: bool = True, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` and (``with_entropy``) entropies under ``logits`` in the engine's
    sampling distribution; the entropy carries a gradient only with ``entropy_grad``."""
    picked = sampling_logits(logits, temperature, banned)
    logp = gather_logprobs(picked, targets)
    if not with_entropy:
        return logp, None
    return logp, entropy_from_logits(picked if entropy_grad else picked.detach())


def _chunk_logprobs(head: torch.nn.Module, temperature: float, banned: Sequence[int], with_entropy: bool,
                    entropy_grad: bool, hidden: torch.Tensor, targets: torch.Tensor):
    logits = type(head).forward(head, hidden)  # the class's forward: a LoRA-wrapped head adapts too
    return score_logits(logits, targets, temperature, banned, with_entropy, entropy_grad)


def _autocast_state(device_type: str) -> dict:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _log_probs(hidden, weight, bias, temperature: float, banned: Sequence[int]) -> torch.Tensor:
    """log softmax of :func:`r1v3.logprobs.sampling_logits` of ``hidden``'s logits, with the
    transform done in place: one [rows, V] float32 tensor besides the result."""
    return torch.log_softmax(sampling_logits(F.linear(hidden, weight, bias), temperature, banned, inplace=True), -1)


def _entropies(p: torch.Tensor, finite_logq: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row, as a batched dot product that keeps ``p`` (no third [rows, V] tensor)."""
    return -torch.bmm(p[:, None, :], finite_logq[:, :, None]).view(-1)


class _FusedHead(torch.autograd.Function):
    """The whole chunk loop as one autograd node, for a plain ``nn.Linear`` head. The backward
    recomputes each chunk's logits and adds its weight gradient into one buffer in place
    (``addmm_``), so no chunk leaves a [V, H] gradient of its own to be summed into the others
    (Liger's fused linear cross-entropy accumulates the same way). Each chunk holds at most two
    [chunk, V] float32 tensors at a time: the rest is done in place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, banned, chunk, with_entropy, entropy_grad):
        ctx.autocast = _autocast_state(hidden.device.type)
        logps, entropies = [], []
        for start in range(0, hidden.shape[0], chunk):
            logq = _log_probs(hidden[start:start + chunk], weight, bias, temperature, banned)
            logps.append(logq.gather(-1, targets[start:start + chunk, None]).squeeze(-1))
            if with_entropy:  # banned entries: p = 0 and a finite log p, so 0 · log p = 0, not NaN
                logq.clamp_(min=torch.finfo(logq.dtype).min)
                entropies.append(-logq.exp().mul_(logq).sum(-1))
            del logq
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.banned, ctx.chunk, ctx.entropy_grad = temperature, banned, chunk, entropy_grad
        entropy = torch.cat(entropies) if with_entropy else hidden.new_zeros(0, dtype=torch.float32)
        if not (with_entropy and entropy_grad):
            ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        scale = 1.0 / (ctx.temperature if ctx.temperature > 0 else 1.0)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            with torch.autocast(**ctx.autocast):  # the logits the forward computed, bit for bit
                logq = _log_probs(hidden[rows], weight, bias, ctx.temperature, ctx.banned)
            logq.clamp_(min=torch.finfo(logq.dtype).min)
            p = logq.exp()
            # d logp[target] / d z = onehot(target) - p;   d H / d z = -p (log p + H)
            if ctx.entropy_grad and grad_entropy is not None:
                entropy_term = logq.add_(_entropies(p, logq)[:, None]).mul_(p).mul_(grad_entropy[rows, None])
            else:
                entropy_term = None
                del logq
            dz = p.mul_(-grad_logp[rows, None])
            dz.scatter_add_(-1, targets[rows, None], grad_logp[rows, None])
            if entropy_term is not None:
                dz.sub_(entropy_term)
                del entropy_term
            dz = dz.mul_(scale).to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = (dz @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(dz.t(), hidden[rows].to(weight.dtype))
            if need_bias:
                grad_bias += dz.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                  banned: Sequence[int], chunk: int, with_entropy: bool = True,
                  entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-probs (and entropies) [N, T] of ``targets`` under ``head(hidden)`` in the
    engine's sampling distribution (:func:`r1v3.logprobs.sampling_logits`), ``chunk`` positions
    at a time; with gradients, each chunk's logits are recomputed in the backward."""
    lead, width = targets.shape, hidden.shape[-1]
    flat, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    if type(head) is torch.nn.Linear and torch.is_grad_enabled() and flat.shape[0]:
        logp, entropy = _FusedHead.apply(flat, head.weight, head.bias, flat_targets, temperature, tuple(banned),
                                         chunk, with_entropy, entropy_grad)
        return logp.view(lead), entropy.view(lead) if with_entropy else None
    run = partial(_chunk_logprobs, head, temperature, tuple(banned), with_entropy, entropy_grad)
    keep_graph = torch.is_grad_enabled()
    logps, entropies = [], []
    for start in range(0, flat.shape[0], chunk):
        piece = (flat[start:start + chunk], flat_targets[start:start + chunk])
        logp, entropy = checkpoint(run, *piece, use_reentrant=False) if keep_graph else run(*piece)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(lead) if logps else hidden.new_zeros(lead, dtype=torch.float32)
    if not with_entropy:
        return logp, None
    return logp, torch.cat(entropies).view(lead) if entropies else torch.zeros_like(logp)
