"""KL drift from the reference policy, policy change between updates, and engine/trainer agreement.

Skywork-R1V3 trains with β = 0 and one update per rollout batch (arXiv 2507.06167, §3.2), so
KL(policy‖old) is 0 by construction and the loss never sees a reference. What drifts is the policy
away from where RL started, so the monitor estimates KL(π‖π_ref) on each measured step's rollouts
with Schulman's k1, k2 and k3 (http://joschu.net/blog/kl-approx.html; docs/design.md §1), loading the
reference on the CPU when the loss did not.

The rollouts were sampled from the policy as it stood before the step's update, with the
engine's log-probs for it, so the estimate is KL(π_before‖π_ref) and costs one reference forward.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from r1v3.stages.health import publish
from r1v3.distributed import is_sharded
from r1v3.rl.entropy import masked_mean
from r1v3.rl.losses import kl_penalty


class KLMonitor(Callback):
    def __init__(self, every_n_steps: int = 1, max_kl: float | None = None,
                 alarm_estimator: Literal["k1", "k2", "k3"] = "k3", max_logprob_gap: float | None = 0.05,
                 max_policy_drift: float | None = None, action: Literal["warn", "stop"] = "warn",
                 reference_device: str = "cpu"):
        """Log ``kl/k1``, ``kl/k2``, ``kl/k3`` to the reference policy every N steps, even at β = 0.

        Args:
            every_n_steps: Measure every N optimizer steps.
            max_kl: Alarm when the ``alarm_estimator`` estimate exceeds this (None = never).
            alarm_estimator: Which estimate the KL alarm reads.
            max_logprob_gap: Alarm when the mean |engine log-prob − trainer log-prob| of the step's
                tokens (``train/logprob_gap``) exceeds this: a stale or broken weight sync. fp32
                engines agree to ~1e-6; bf16 GPU engines stay in the 1e-3–1e-2 range.
            max_policy_drift: Alarm when the policy change between the updates of one rollout batch
                (``kl/policy_drift``, k3 of KL(π_old‖π)) exceeds this.
            action: ``warn`` (a warning and an ``alarm/…`` metric), or also ``stop`` training. An
                alarm fires when its signal crosses the threshold, not again while it stays above.
            reference_device: Where a reference loaded only for monitoring lives between uses; it
                visits the training device for each measurement.
        """
        super().__init__()
        self.every_n_steps, self.max_kl, self.alarm_estimator = every_n_steps, max_kl, alarm_estimator
        self.max_logprob_gap, self.max_policy_drift = max_logprob_gap, max_policy_drift
        self.action, self.reference_device = action, reference_device
        self.events: list[tuple[int, str, str]] = []
        self.history: list[dict] = []  # {"step", "k1", "k2", "k3"} per measurement
        self._above: set[str] = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Runs before the model is built: a LoRA policy then keeps what its reference needs.
        if hasattr(pl_module, "wants_reference"):
            pl_module.wants_reference = True

    def state_dict(self) -> dict:
        return {"above": sorted(self._above), "events": list(self.events), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self._above = set(state.get("above", []))
        self.events = [tuple(e) for e in state.get("events", [])]
        self.history = list(state.get("history", []))

    @staticmethod
    def estimates(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Token-mean k1/k2/k3 estimates of KL(π‖π_ref) from samples of π."""
        return {k: float(masked_mean(kl_penalty(logp, ref_logp, k), mask.bool())) for k in ("k1", "k2", "k3")}

    def measure(self, pl_module, step) -> dict[str, float]:
        """k1/k2/k3 on one step record (``StepRollouts``) against the reference policy."""
        reference = pl_module.reference_model(device=self.reference_device)
        home = next(reference.parameters()).device
        # A monitoring-only reference waits on its own device between uses; a sharded one stays put
        # (its placement, offload included, is FSDP2's).
        visiting = home != pl_module.device and not is_sharded(reference)
        if visiting:
            reference.to(pl_module.device)
        try:
            ref_logp = pl_module.reference_logprobs(step, model=reference)
        finally:
            if visiting:
                reference.to(home)
        return self.estimates(step.rollouts.logprobs, ref_logp, step.rollouts.completion_mask)

    def _check(self, trainer, pl_module, name: str, value: float, limit: float | None, why: str) -> None:
        """Alarm when ``value`` crosses above ``limit``; a signal that stays above it does not
        repeat the alarm until it has come back under."""
        above = limit is not None and value > limit
        if above and name not in self._above:
            self._alarm(trainer, pl_module, name, why)
        if above:
            self._above.add(name)
        else:
            self._above.discard(name)

    def _alarm(self, trainer, pl_module, name: str, why: str) -> None:
        step = trainer.global_step
        self.events.append((step, name, why))
        publish(pl_module, name, why)
        rank_zero_warn(f"[r1v3] KL monitor at step {step}: {name} ({why}); action: {self.action}")
        if self.action == "stop":
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = getattr(pl_module, "last_rollouts", None)
        if step is None or trainer.global_step % self.every_n_steps:
            return
        kl = self.measure(pl_module, step)
        self.history.append({"step": trainer.global_step, **kl})
        pl_module.log_dict({f"kl/{k}": v for k, v in kl.items()})
        value = kl[self.alarm_estimator]
        self._check(trainer, pl_module, "kl", value, self.max_kl,
                    f"{self.alarm_estimator} KL to the reference {value:.4g} > {self.max_kl}")
        metrics = trainer.callback_metrics
        if "train/logprob_gap" in metrics:
            gap = float(metrics["train/logprob_gap"])
            self._check(trainer, pl_module, "logprob_gap", gap, self.max_logprob_gap,
                        f"engine and trainer log-probs differ by {gap:.3g} > {self.max_logprob_gap} "
                        "on average: is the weight sync stale?")
        hp = pl_module.hparams
        if hp.get("num_iterations", 1) * hp.get("mini_batches", 1) > 1 and "train/approx_kl_old" in metrics:
            drift = float(metrics["train/approx_kl_old"])
            pl_module.log("kl/policy_drift", drift)
            self._check(trainer, pl_module, "policy_drift", drift, self.max_policy_drift,
                        f"KL(π_old‖π) between updates {drift:.4g} > {self.max_policy_drift}")
        # 1 where an alarm fired, 0 at every other measurement: Lightning keeps re-reporting the
        # last value of a step metric, so a lone 1 would repeat at later logging steps.
        fired = {name for step, name, _ in self.events if step == trainer.global_step}
        for name, limit in (("kl", self.max_kl), ("logprob_gap", self.max_logprob_gap),
                            ("policy_drift", self.max_policy_drift)):
            if limit is not None:
                pl_module.log(f"alarm/{name}", float(name in fired))
