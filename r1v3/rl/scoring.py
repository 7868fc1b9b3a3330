"""One place that turns a step's rollouts into log-probs, entropies and micro-batches, under any
model: the policy (with gradients for the update), the old policy and the reference (without).

Every pass builds its batches from the step's encoded prompts (``StepRollouts.encoded``), so no
image goes through the processor again, and shares each prompt's pass among its group's rows where
the model allows it (:mod:`r1v3.rl.prefix`).
"""

from __future__ import annotations

import contextlib

import torch

from r1v3.distributed import max_over_ranks
from r1v3.rl import prefix
from r1v3.rl.head import head_bypassed, head_logprobs, logits_chunk, score_logits
from r1v3.rl.trajectory import StepRollouts


def micro_batches(step: StepRollouts, rows: torch.Tensor, budget: int, model: torch.nn.Module) -> list[torch.Tensor]:
    """``rows`` cut into runs that fit ``budget`` tokens (prompts counted once per run when shared)."""
    return list(prefix.micro_batches(step.encoded, step.rollouts.completion_mask, rows, step.group_size, budget,
                                     prefix.shares_prompts(model)))


def synced_micro_batches(step: StepRollouts, rows: torch.Tensor, budget: int, model: torch.nn.Module,
                         device) -> list[tuple[torch.Tensor, bool]]:
    """``micro_batches`` as (rows, real) pairs. When the model is sharded, each forward/backward
    is a collective, so a rank short of micro-batches pads with passes over one row (real=False)
    until it runs as many as the busiest rank."""
    micros = [(m, True) for m in micro_batches(step, rows, budget, model)]
    n = max_over_ranks(len(micros), model, device)
    return micros + [(torch.tensor([0]), False)] * (n - len(micros))


def completion_logprobs(model: torch.nn.Module, step: StepRollouts, rows: torch.Tensor, temperature: float,
                        device, with_entropy: bool = True,
                        entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [len(rows), T] of the sampled completions under ``model``, in the
    distribution the engine samples (:func:`r1v3.logprobs.sampling_logits`: tempered, banned tokens
    out), and that distribution's entropy at each completion position (None without
    ``with_entropy``: over a real vocabulary it is a full softmax per position). Gradients flow
    when the caller enables them; through the entropy only with ``entropy_grad`` (the entropy
    bonus), since its backward is another pass over the vocabulary."""
    rollouts = step.rollouts
    ids = rollouts.completion_ids[rows].to(device)
    chunk = logits_chunk(model)
    with head_bypassed(model) if chunk else contextlib.nullcontext() as head:
        out = prefix.rows_completion_logits(model, step.encoded, step.group_index[rows].tolist(), ids,
                                            rollouts.completion_mask[rows].to(device), device)
    if chunk:  # ``out`` holds hidden states; the head runs a chunk of positions at a time
        logp, entropy = head_logprobs(out, head, ids, temperature, step.banned_tokens, chunk, with_entropy,
                                      entropy_grad)
    else:
        logp, entropy = score_logits(out, ids, temperature, step.banned_tokens, with_entropy, entropy_grad)
    return logp.cpu() * rollouts.completion_mask[rows], entropy.cpu() if entropy is not None else None


@torch.no_grad()
def all_rows(model: torch.nn.Module, step: StepRollouts, temperature: float, budget: int, device,
             rows: torch.Tensor | None = None, entropy: bool = False) -> torch.Tensor:
    """Log-probs (or, with ``entropy``, entropies) [len(rows), T] of the step's completions
    (default: all) under ``model``, micro-batch by micro-batch, without gradients: the old-policy,
    reference and monitoring passes."""
    if rows is None:
        rows = torch.arange(step.rollouts.completion_ids.shape[0])
    parts = []
    for micro, real in synced_micro_batches(step, rows, budget, model, device):
        logp, ent = completion_logprobs(model, step, micro, temperature, device, with_entropy=entropy)
        if real:
            parts.append(ent if entropy else logp)
    return torch.cat(parts) if parts else step.rollouts.logprobs[:0]
