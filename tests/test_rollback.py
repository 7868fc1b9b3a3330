"""Self-healing runs: an induced collapse is rolled back to the last healthy checkpoint, and the
run recovers; the healthy and ranked checkpoints share a directory without deleting each other's
files (r1v3/callbacks/rollback.py, r1v3/callbacks/checkpoint.py).

The collapse: ``LRSpike`` multiplies the learning rate (2e-4, the demo's) by 100 for two steps of
a GRPO run from the weak SFT start (``sft_start``, reward about 0.3). When written, the run
without the action fell to a reward of 0.04 over its last 10 steps and never came back; with it,
the reward-collapse alarm fired two steps after the spike, the run went back to its step-12
checkpoint and ended at 0.42.
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from r1v3.callbacks import RankedCheckpoint, Rollback
from r1v3.stages.health import DivergedError, StageHealth
from test_resume import fit, run_head, trajectory

STEPS, SPIKE, KILL_AT, LR = 30, 12, 17, 2e-4


def write_config(run: Path, model: Path, data: Path, action: bool) -> Path:
    run.mkdir(parents=True)
    rollback = "    - class_path: r1v3.callbacks.Rollback\n" if action else ""
    config = run / "config.yaml"
    config.write_text(run_head(run, STEPS) + f"""\
    - class_path: r1v3.callbacks.fault.LRSpike
      init_args: {{at_step: {SPIKE}, factor: 100.0, steps: 2}}
    - class_path: r1v3.callbacks.LRInstabilityAlarm
      init_args: {{window: 10, reward_drop: 0.7}}  # batches of 32 samples are noisy: 0.5 fired early
{rollback}    - class_path: r1v3.callbacks.RankedCheckpoint
      init_args: {{dirpath: {run}/ckpt, save_top_k: 0, save_last: true, every_n_train_steps: 1,
                  keep_healthy: 2, healthy_every_n_steps: 4}}
model:
  class_path: r1v3.stages.grpo.GRPOStage
  init_args:
    model_path: {model}
    sampling: {{n: 4, max_new_tokens: 32}}
    rollout_log_every: 0
    optimizer: {{lr: {LR}, warmup_ratio: 0.0, schedule: constant}}
data:
  class_path: r1v3.data_modules.webdata.WebDataModule
  init_args: {{train: {data}/train, batch_size: 8, seed: 5}}
""")
    return config


def mean_last(values: dict[int, float], n: int = 10) -> float:
    return sum(values[s] for s in sorted(values)[-n:]) / n


@pytest.mark.slow
def test_an_induced_collapse_is_rolled_back_and_recovers_exactly_after_a_sigkill(tmp_path, sft_start):
    model, data = sft_start
    without = write_config(tmp_path / "without", model, data, action=False)
    assert (done := fit(without)).returncode == 0, done.stderr[-3000:]
    straight = write_config(tmp_path / "with", model, data, action=True)
    assert (done := fit(straight)).returncode == 0, done.stderr[-3000:]

    [record] = [json.loads(line) for line in (tmp_path / "with" / "ckpt" / "rollbacks.jsonl").read_text().splitlines()]
    # healthy checkpoints every 4 steps, no alarm before the collapse: the newest one at least
    # onset_steps (2) before the alarm is step 12's, saved before the spike's first update
    assert SPIKE < record["step"] <= SPIKE + 4 and {"reward_collapse", "entropy_collapse"} & set(record["causes"])
    assert record["restored_step"] == 12 and record["checkpoint"] == "healthy-step=12.ckpt"
    assert f"rollback 1/3 at step {record['step']}" in done.stderr

    lr_with = trajectory(tmp_path / "with", "train/lr")
    assert lr_with[STEPS - 1] == pytest.approx(LR * 0.5)  # the spike is over; the rollback's factor stays
    assert trajectory(tmp_path / "without", "train/lr")[STEPS - 1] == pytest.approx(LR)
    reward_with = trajectory(tmp_path / "with", "train/reward_mean")
    reward_without = trajectory(tmp_path / "without", "train/reward_mean")
    assert mean_last(reward_without) < 0.1  # collapsed for good (0.04 when written)
    assert mean_last(reward_with) > mean_last(reward_without) + 0.2  # 0.42 vs 0.04 when written

    crashed = write_config(tmp_path / "crashed", model, data, action=True)
    killed = fit(crashed, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = fit(crashed, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for metric in ("train/reward_mean", "train/lr", "train/loss"):
        expected, got = trajectory(tmp_path / "with", metric), trajectory(tmp_path / "crashed", metric)
        assert set(range(KILL_AT, STEPS)) <= set(got)
        assert {step: expected[step] for step in got} == got, f"bit-exact {metric} after the rollback and resume"
    # the resumed run knows it has rolled back once: no second record, the same healthy files
    assert len((tmp_path / "crashed" / "ckpt" / "rollbacks.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "crashed" / "ckpt").glob("healthy-*")) == \
        sorted(p.name for p in (tmp_path / "with" / "ckpt").glob("healthy-*"))


class Toy(StageHealth, LightningModule):
    """A linear model whose validation score and alarms follow a script, to drive the checkpoint
    policies step by step."""

    def __init__(self, scores: dict[int, float], alarms: dict[int, str] | None = None, diverge_at: int | None = None,
                 nan_from: int | None = None):
        super().__init__()
        self.model = torch.nn.Linear(2, 1)
        self.scores, self.script, self.diverge_at, self.nan_from = scores, alarms or {}, diverge_at, nan_from

    def training_step(self, batch, batch_idx):
        ends_at = self.global_step + 1  # the step this batch's update completes, as the alarm callbacks see it
        name = "reward_collapse" if self.diverge_at is not None and ends_at > self.diverge_at else self.script.get(ends_at)
        if name:
            self.alarms.append({"step": ends_at, "name": name, "why": "scripted"})
        loss = self.model(batch[0]).pow(2).mean()
        return loss * float("nan") if self.nan_from is not None and self.global_step >= self.nan_from else loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.scores.get(self.global_step, 0.0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(64, 2)), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 2)), batch_size=1)


def run_toy(tmp_path, module, steps, val_every, callbacks):
    validation = {"val_check_interval": val_every, "check_val_every_n_epoch": None} if val_every else {"limit_val_batches": 0}
    Trainer(accelerator="cpu", max_steps=steps, **validation, logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=callbacks).fit(module)
    return sorted(p.name for p in tmp_path.glob("*.ckpt"))


def test_a_checkpoint_the_healthy_list_holds_outlives_its_ranking(tmp_path):
    # top-1 by val/score among evaluations at steps 2, 4, 6, 8; each top-k file judged healthy
    # joins the last-2 healthy list; an alarm at step 7 makes step 8's checkpoint unhealthy
    keeper = RankedCheckpoint(dirpath=tmp_path, filename="{step}", monitor="val/score", mode="max", save_top_k=1,
                              keep_healthy=2, healthy_window=2)
    files = run_toy(tmp_path, Toy({2: 1.0, 4: 2.0, 6: 0.5, 8: 3.0}, {7: "kl"}), 8, 2, [keeper])
    # r2 fell out of the top-1 at step 4 but stays, being healthy; r4 fell out at step 8 and stays
    # too; r8 is kept by the ranking alone
    assert files == ["step=2.ckpt", "step=4.ckpt", "step=8.ckpt"]
    assert [e["step"] for e in keeper.healthy] == [2, 4] and [Path(p).name for p in keeper.best_k_models] == ["step=8.ckpt"]


def test_a_checkpoint_the_ranking_holds_outlives_the_healthy_list(tmp_path):
    # healthy checkpoints every 2 steps (keep 1), evaluations at steps 3, 6, 9: step 3's is the best
    keeper = RankedCheckpoint(dirpath=tmp_path, filename="{step}", monitor="val/score", mode="max", save_top_k=1,
                              keep_healthy=1, healthy_every_n_steps=2, healthy_window=2)
    files = run_toy(tmp_path, Toy({3: 5.0, 6: 1.0, 9: 1.0}), 10, 3, [keeper])
    # r3 joined the healthy list at step 3 and left it at step 4, but the ranking still holds it;
    # the healthy-only files went as newer ones came
    assert files == ["healthy-step=10.ckpt", "step=3.ckpt"]
    assert [e["step"] for e in keeper.healthy] == [10]


def test_rollback_gives_up_after_max_rollbacks_with_a_clear_error(tmp_path):
    keeper = RankedCheckpoint(dirpath=tmp_path, save_top_k=0, keep_healthy=3, healthy_every_n_steps=2, healthy_window=1)
    rollback = Rollback(on=["reward_collapse"], max_rollbacks=2, onset_steps=1)
    with pytest.raises(DivergedError, match="after 2 rollbacks"):
        run_toy(tmp_path, Toy({}, diverge_at=7), 30, None, [rollback, keeper])
    # healthy at 2, 4, 6; the alarm at step 8 went back to 6, the next one (which 6 led straight
    # back into) to 4, and the third gave up
    assert [(r["step"], r["restored_step"]) for r in rollback.rollbacks] == [(8, 6), (9, 4)]
    assert [r["lr"] for r in rollback.rollbacks] == [pytest.approx([0.05]), pytest.approx([0.025])]


def test_rollback_refuses_a_trainer_without_healthy_checkpoints(tmp_path):
    from r1v3.errors import UserError

    with pytest.raises(UserError, match="keep_healthy > 0"):
        run_toy(tmp_path, Toy({}), 2, None, [Rollback(), RankedCheckpoint(dirpath=tmp_path)])
    with pytest.raises(UserError, match="unknown alarm"):
        Rollback(on=["entropy_surges"])


def test_nonfinite_updates_in_a_row_trigger_a_rollback_instead_of_stopping(tmp_path):
    keeper = RankedCheckpoint(dirpath=tmp_path, save_top_k=0, keep_healthy=2, healthy_every_n_steps=2, healthy_window=1)
    rollback = Rollback(on=["nonfinite"], max_rollbacks=1)
    module = Toy({}, nan_from=5)
    module.max_nonfinite_in_a_row = 2
    with pytest.raises(DivergedError, match="after 1 rollbacks"):
        run_toy(tmp_path, module, 30, None, [rollback, keeper])
    # NaN losses from step 5 on: the 2nd skipped update in a row (step 7) raised the alarm instead
    # of NonFiniteError; of the healthy checkpoints (2, 4, 6), the newest at least onset_steps (2)
    # before it is step 4's; the next alarm gave up
    [first] = rollback.rollbacks
    assert first["causes"] == ["nonfinite"] and (first["step"], first["restored_step"]) == (7, 4)
    assert [a["name"] for a in module.alarms] == ["nonfinite", "nonfinite"]
