"""Alarms for the failure signatures Skywork-R1V3 reports for a too-high RL learning rate
(arXiv 2507.06167: lr 1e-5 gives an entropy surge or collapse late in training): entropy surge,
entropy collapse, grad-norm spike, reward collapse, and repetitive degenerate output.

Each signal compares the step's value with the running median of the previous ``window`` steps,
so it adapts to the scale of any model. :meth:`LRInstabilityAlarm.check` is pure; the Lightning
hooks only feed it the logged metrics and the step's rollouts, then act.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Literal, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from r1v3.stages.health import publish


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean share of repeated word n-grams per text (0 = none repeated, → 1 = one n-gram looped)."""
    rates = []
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def scale_learning_rates(trainer, factor: float) -> list[float]:
    """Multiply every param group's learning rate by ``factor``, and the schedulers' base rates
    (and last reported rates) with it, so the schedule goes on from the scaled rates. Returns the
    groups' new rates."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [lr * factor for lr in scheduler._last_lr]
    rates = []
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            rates.append(group["lr"])
    return rates


SIGNALS = ("entropy_surge", "entropy_collapse", "grad_spike", "reward_collapse", "repetition")


class LRInstabilityAlarm(Callback):
    def __init__(self, window: int = 20, min_history: int = 5, entropy_surge: float = 2.0,
                 entropy_collapse: float = 0.25, grad_spike: float = 5.0, reward_drop: float = 0.5,
                 repetition: float = 0.5, ngram: int = 4,
                 action: Literal["warn", "reduce_lr", "stop"] = "warn", lr_factor: float = 0.5):
        """Watch entropy, grad norm, reward and rollout repetition for learning-rate instability.

        Args:
            window: Steps in the running median each value is compared with.
            min_history: Steps to observe before any alarm can fire.
            entropy_surge: Fire when entropy exceeds this multiple of its running median.
            entropy_collapse: Fire when entropy falls below this fraction of its running median.
            grad_spike: Fire when the grad norm exceeds this multiple of its running median.
            reward_drop: Fire when the mean reward falls by this fraction of its running median.
            repetition: Fire when the rollouts' repeated n-gram share exceeds this.
            ngram: n of the repetition measure.
            action: ``warn``; ``reduce_lr`` by ``lr_factor``; or ``stop`` training. Every alarm is
                also published to the stage, where ``r1v3.callbacks.Rollback`` can act on it.
            lr_factor: Multiplier applied to every learning rate by ``reduce_lr``.
        """
        super().__init__()
        self.window, self.min_history = window, min_history
        self.entropy_surge, self.entropy_collapse = entropy_surge, entropy_collapse
        self.grad_spike, self.reward_drop = grad_spike, reward_drop
        self.repetition, self.ngram = repetition, ngram
        self.action, self.lr_factor = action, lr_factor
        self.history = {k: deque(maxlen=window) for k in ("entropy", "grad_norm", "reward")}
        self.events: list[tuple[int, str, str]] = []

    def check(self, step: int, metrics: dict, texts: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """Signals fired at ``step`` as (name, explanation); the values then join the history."""
        fired = []

        def median(key):
            values = self.history[key]
            return statistics.median(values) if len(values) >= self.min_history else None

        entropy, grad, reward = metrics.get("entropy"), metrics.get("grad_norm"), metrics.get("reward")
        if entropy is not None and (m := median("entropy")) is not None and m > 0:
            if entropy > self.entropy_surge * m:
                fired.append(("entropy_surge", f"entropy {entropy:.4g} > {self.entropy_surge}× median {m:.4g}"))
            elif entropy < self.entropy_collapse * m:
                fired.append(("entropy_collapse", f"entropy {entropy:.4g} < {self.entropy_collapse}× median {m:.4g}"))
        if grad is not None and (m := median("grad_norm")) is not None and m > 0 and grad > self.grad_spike * m:
            fired.append(("grad_spike", f"grad norm {grad:.4g} > {self.grad_spike}× median {m:.4g}"))
        if reward is not None and (m := median("reward")) is not None and m > 0 and reward < (1 - self.reward_drop) * m:
            fired.append(("reward_collapse", f"reward {reward:.4g} fell over {self.reward_drop:.0%} below median {m:.4g}"))
        if texts:
            rate = repetition_rate(texts, self.ngram)
            if rate > self.repetition:
                fired.append(("repetition", f"{rate:.0%} of {self.ngram}-grams in the rollouts repeat"))
        for key, value in (("entropy", entropy), ("grad_norm", grad), ("reward", reward)):
            if value is not None:
                self.history[key].append(float(value))
        self.events += [(step, name, why) for name, why in fired]
        return fired

    def state_dict(self) -> dict:
        # the running medians: a resumed run fires where the uninterrupted one would have
        return {"history": {k: list(v) for k, v in self.history.items()}, "events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        for key, values in state.get("history", {}).items():
            self.history[key].extend(values)
        self.events = [tuple(e) for e in state.get("events", [])]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        metrics = {k: float(m[f"train/{src}"]) for k, src in
                   (("entropy", "entropy"), ("grad_norm", "grad_norm"), ("reward", "reward_mean")) if f"train/{src}" in m}
        step = getattr(pl_module, "last_rollouts", None)
        texts = step.texts if step is not None else None
        fired = self.check(trainer.global_step, metrics, texts)
        # 1 where a signal fired, 0 otherwise: Lightning re-reports a step metric's last value at
        # later logging steps, so a lone 1 would look like a run of alarms.
        for name in SIGNALS:
            pl_module.log(f"alarm/{name}", float(any(n == name for n, _ in fired)))
        for name, why in fired:
            publish(pl_module, name, why)
            rank_zero_warn(f"[r1v3] LR instability at step {trainer.global_step}: {name} ({why}); action: {self.action}")
            if self.action == "reduce_lr":
                scale_learning_rates(trainer, self.lr_factor)
            elif self.action == "stop":
                trainer.should_stop = True
