"""The typed record of one step's rollouts, from the prompts to the advantages.

The stage builds one per training step (and one per validation batch) and fills it top-down:
rollout → scores → advantages. The update, the log-prob passes and the monitoring callbacks all
read it by field name; its prompts are encoded once (``encoded``) and never again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from r1v3.encoding import EncodedPrompts
from r1v3.rl.advantages import zero_variance_groups
from r1v3.rl.entropy import masked_mean
from r1v3.rl.losses import kl_penalty
from r1v3.rl.rollout import Prompt, Rollouts


@dataclass
class StepRollouts:
    prompts: list[Prompt]  # rendered prompt text + PIL images (vLLM and the rollout log read these)
    encoded: EncodedPrompts  # the same prompts through the processor, once each
    rollouts: Rollouts  # G completions per prompt, prompt-major, with the engine's log-probs
    meta: dict = field(default_factory=dict)  # the batch's id, question, answer, options, …
    scores: list[dict] = field(default_factory=list)  # the reward function's output per completion
    rewards: torch.Tensor | None = None  # [N] the rewards the advantages were computed from
    advantages: torch.Tensor | None = None  # [N] one per completion, broadcast to its tokens
    loss_mask: torch.Tensor | None = None  # [N, T] tokens that enter the loss
    ref_logprobs: torch.Tensor | None = None  # [N, T] under the reference policy, when KL is on
    banned_tokens: tuple[int, ...] = ()  # never sampled: every log-prob pass scores them out too

    @property
    def group_size(self) -> int:
        return self.rollouts.group_size

    @property
    def group_index(self) -> torch.Tensor:
        """[N] the prompt (group) each completion belongs to."""
        return torch.arange(self.rollouts.completion_ids.shape[0]) // self.group_size

    @property
    def texts(self) -> list[str]:
        return self.rollouts.texts

    @property
    def n_tokens(self) -> float:
        return float(self.rollouts.completion_mask.sum())

    def summary(self) -> dict[str, float]:
        """The step's rollout statistics, as logged under ``train/``."""
        rollouts, rewards, scores = self.rollouts, self.rewards, self.scores
        lengths = rollouts.lengths.float()
        out = {
            "reward_mean": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else 0.0,
            "accuracy": torch.tensor([float(s.get("accuracy", 0.0)) for s in scores]).mean(),
            "format_rate": torch.tensor([float(s.get("format", 0.0)) for s in scores]).mean(),
            "truncation_rate": rollouts.truncated.float().mean(),
            "response_len_mean": lengths.mean(), "response_len_max": lengths.max(),
            "zero_variance_groups": zero_variance_groups(rewards, self.group_size).float().mean(),
        }
        if self.ref_logprobs is not None:  # k3 of KL(π‖π_ref) on the step's own samples
            out["kl_ref"] = masked_mean(kl_penalty(rollouts.logprobs, self.ref_logprobs, "k3"),
                                        rollouts.completion_mask)
        return {k: float(v) for k, v in out.items()}
