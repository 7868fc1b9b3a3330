"""Log-probs and entropies from the final hidden states, a chunk of positions at a time, so that
the [N, T, V] logits of a micro-batch never exist at once.

At a real vocabulary (~150k entries) the logits dominate the update's memory: 32 completions of
1,024 tokens are about 20 GB in fp32, several times the activations of a 7B model's layers. Here the
model's forward stops before its output head (:func:`head_bypassed`), the caller gathers the hidden
states of the completion positions, and :func:`head_logprobs` applies the head, the sampling
transform, the log-prob gather and the entropy to ``chunk`` positions at a time. Each chunk runs
under activation checkpointing, so the backward recomputes its logits instead of keeping them: the
peak is one chunk's [chunk, V] plus the hidden states. The price is a second head matmul per
position in the backward. The idea is Liger Kernel's fused linear cross-entropy (which also fuses
the backward into the forward); the code is ours (docs/performance.md, "Chunked log-probs").
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
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


def _chunk_logprobs(head: torch.nn.Module, temperature: float, banned: Sequence[int], with_entropy: bool,
                    entropy_grad: bool, hidden: torch.Tensor, targets: torch.Tensor):
    logits = type(head).forward(head, hidden)  # the class's forward: a LoRA-wrapped head adapts too
    picked = sampling_logits(logits, temperature, banned)
    logp = gather_logprobs(picked, targets)
    if not with_entropy:
        return logp, None
    return logp, entropy_from_logits(picked if entropy_grad else picked.detach(), chunk_size=hidden.shape[0])


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                  banned: Sequence[int], chunk: int, with_entropy: bool = True,
                  entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-probs (and entropies) [N, T] of ``targets`` under ``head(hidden)`` in the
    engine's sampling distribution (:func:`r1v3.logprobs.sampling_logits`), ``chunk`` positions
    at a time; with gradients, each chunk's logits are recomputed in the backward."""
    lead, width = targets.shape, hidden.shape[-1]
    flat, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
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
