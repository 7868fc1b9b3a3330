"""Roll a collapsing run back to its last healthy checkpoint, with a lower learning rate, and go on.

The alarms (``LRInstabilityAlarm``, ``KLMonitor``, the stage's non-finite guard) publish what they
see to the stage's alarm log (r1v3.stages.health). When an alarm this callback is configured for
fires, in the same step it:

1. picks the newest checkpoint ``RankedCheckpoint(keep_healthy=…)`` judged healthy, saved at least
   ``onset_steps`` before the alarm (a collapse begins before a running median notices it);
2. loads its weights and optimizer state through the trainer's strategy (sharded checkpoints too),
   and forgets the healthy checkpoints saved after it, which belong to the collapsing path;
3. multiplies every learning rate, and the schedule's base rates, by ``lr_factor``;
4. optionally moves the rollout seeds (``reseed``), and makes the rollout engine take every tensor
   of the restored weights (adapters included) and be checked against the trainer again before
   its next rollout.

The step counter and the data stream go on: the batches seen since the restored checkpoint are
skipped, not replayed (docs/monitoring.md says why). A checkpoint that leads straight back into an
alarm, before a newer healthy one exists, is dropped, so a second rollback goes further back.
After ``max_rollbacks`` the run stops with one clear error line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from r1v3.callbacks.checkpoint import RankedCheckpoint
from r1v3.callbacks.kl_monitor import KLMonitor
from r1v3.callbacks.lr_alarm import LRInstabilityAlarm, scale_learning_rates
from r1v3.errors import UserError
from r1v3.stages.health import DivergedError

TRIGGERS = ("entropy_surge", "entropy_collapse", "reward_collapse", "kl", "logprob_gap", "nonfinite")
KNOWN = TRIGGERS + ("grad_spike", "repetition", "policy_drift")


class Rollback(Callback):
    def __init__(self, on: Sequence[str] = TRIGGERS, lr_factor: float = 0.5, reseed: bool = True,
                 max_rollbacks: int = 3, onset_steps: int = 2):
        """Roll back to the last healthy checkpoint when one of the ``on`` alarms fires.

        Needs a ``r1v3.callbacks.RankedCheckpoint`` with ``keep_healthy`` > 0, and must come after
        the alarm callbacks in ``trainer.callbacks`` (it acts on the alarms of the same step).

        Args:
            on: Alarm names that trigger a rollback: ``entropy_surge``, ``entropy_collapse``,
                ``reward_collapse``, ``grad_spike``, ``repetition`` (LRInstabilityAlarm); ``kl``,
                ``logprob_gap``, ``policy_drift`` (KLMonitor); ``nonfinite`` (the stage, after its
                ``max_nonfinite_in_a_row`` skipped updates).
            lr_factor: Every learning rate is multiplied by this at each rollback.
            reseed: Draw new rollout seeds after a rollback (the collapsed run's samples are not redrawn).
            max_rollbacks: Give up with an error at the alarm after this many rollbacks.
            onset_steps: Only checkpoints saved at least this many steps before the alarm qualify.
        """
        super().__init__()
        unknown = sorted(set(on) - set(KNOWN))
        if unknown or not on:
            raise UserError(f"Rollback.on: unknown alarm(s) {unknown or '(none given)'}; choose from {', '.join(KNOWN)}")
        if not 0 < lr_factor <= 1 or max_rollbacks < 1 or onset_steps < 0:
            raise UserError(f"Rollback: need 0 < lr_factor <= 1, max_rollbacks >= 1, onset_steps >= 0 "
                            f"(got {lr_factor}, {max_rollbacks}, {onset_steps})")
        self.on, self.lr_factor, self.reseed = tuple(on), lr_factor, reseed
        self.max_rollbacks, self.onset_steps = max_rollbacks, onset_steps
        self.rollbacks: list[dict] = []  # what each did, for the logs, the report and a resume
        self.seen = 0  # alarms of the stage's log already acted on (or not meant for us)
        self.checkpoints: RankedCheckpoint | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        keepers = [cb for cb in trainer.callbacks if isinstance(cb, RankedCheckpoint) and cb.keep_healthy]
        if not keepers:
            raise UserError("Rollback needs a r1v3.callbacks.RankedCheckpoint with keep_healthy > 0 (and "
                            "healthy_every_n_steps > 0) in trainer.callbacks: it returns to those checkpoints")
        self.checkpoints = keepers[0]
        mine = trainer.callbacks.index(self)
        late = [type(cb).__name__ for cb in trainer.callbacks[mine + 1:] if isinstance(cb, (LRInstabilityAlarm, KLMonitor))]
        if late:
            raise UserError(f"put r1v3.callbacks.Rollback after {', '.join(late)} in trainer.callbacks: it acts on "
                            "the alarms they raise in the same step")
        pl_module.recoverable = frozenset(self.on)

    def state_dict(self) -> dict:
        return {"rollbacks": list(self.rollbacks), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks, self.seen = list(state.get("rollbacks", [])), state.get("seen", 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        alarms = getattr(pl_module, "alarms", [])
        new = [a for a in alarms[self.seen:] if a["name"] in self.on]
        self.seen = len(alarms)
        # every rank rolls back together: the restore and what follows are collectives when sharded
        if trainer.strategy.reduce_boolean_decision(bool(new), all=False):
            self.roll_back(trainer, pl_module, new)
        if self.rollbacks:  # 1 at a rollback, 0 after: a step metric's last value repeats
            pl_module.log("alarm/rollback", float(self.rollbacks[-1]["step"] == trainer.global_step))

    def roll_back(self, trainer, pl_module, causes: list[dict]) -> None:
        step = trainer.global_step
        cause = "; ".join(f"{a['name']} ({a['why']})" for a in causes) or "an alarm on another rank"
        if len(self.rollbacks) >= self.max_rollbacks:
            raise DivergedError(f"step {step}: {cause}, after {len(self.rollbacks)} rollbacks (max_rollbacks): giving "
                                "up; lower the learning rate, or raise max_rollbacks")
        keeper = self.checkpoints
        if self.rollbacks and (last := keeper.last_healthy(step)) and last["step"] == self.rollbacks[-1]["restored_step"]:
            keeper.drop_healthy(trainer, after=last["step"] - 1)  # it led straight back into an alarm
        target = keeper.last_healthy(step - self.onset_steps)
        if target is None:
            raise DivergedError(f"step {step}: {cause}; no healthy checkpoint saved before step "
                                f"{step - self.onset_steps} to roll back to")
        before = [[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers]
        checkpoint = restore(trainer, pl_module, target["path"])
        for opt, rates in zip(trainer.optimizers, before):  # the optimizer state brought its own rates back
            for group, lr in zip(opt.param_groups, rates):
                group["lr"] = lr
        lrs = scale_learning_rates(trainer, self.lr_factor)
        keeper.drop_healthy(trainer, after=target["step"])
        pl_module.after_rollback(checkpoint, self.reseed)
        record = {"step": step, "causes": [a["name"] for a in causes], "why": cause,
                  "checkpoint": Path(target["path"]).name, "restored_step": target["step"], "lr": lrs,
                  "reseeded": self.reseed}
        self.rollbacks.append(record)
        rank_zero_warn(f"[r1v3] rollback {len(self.rollbacks)}/{self.max_rollbacks} at step {step}: {cause}; "
                       f"restored {record['checkpoint']} (step {target['step']}), learning rate now "
                       f"{', '.join(f'{lr:.3g}' for lr in lrs)}")
        if trainer.is_global_zero:
            with (Path(keeper.dirpath) / "rollbacks.jsonl").open("a") as out:
                out.write(json.dumps(record) + "\n")
        pl_module.log_dict({"rollback/count": float(len(self.rollbacks)),
                            "rollback/restored_step": float(target["step"])})


def restore(trainer, pl_module, path: str) -> dict:
    """Weights and optimizer state of a checkpoint, through the strategy: a sharded (DCP)
    checkpoint loads in place, each rank reading its shards. Loops, schedules, callbacks and the
    data position are left as they are."""
    strategy = trainer.strategy
    checkpoint = strategy.load_checkpoint(path, weights_only=True)
    strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
    strategy.load_optimizer_state_dict(checkpoint)
    return checkpoint

