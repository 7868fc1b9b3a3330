"""Sample rollouts as a table: a wandb Table when logging to wandb, else JSONL beside the logs."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ["step", "id", "image", "question", "completion", "extracted", "reward", "finish"]


class RolloutTable:
    def __init__(self, every: int = 50, max_rows: int = 16):
        self.every, self.max_rows, self.calls = every, max_rows, 0

    def maybe_log(self, module, meta: dict, rollouts, scores: list[dict]) -> Path | None:
        self.calls += 1
        if not self.every or (self.calls - 1) % self.every or not module.trainer.is_global_zero:
            return None
        G = rollouts.group_size
        rows = []
        for i in range(min(len(rollouts.texts), self.max_rows)):
            p = i // G
            rows.append([module.global_step, meta["id"][p], f"{meta['id'][p]}#img0", meta["question"][p],
                         rollouts.texts[i], scores[i].get("extracted"), float(scores[i]["reward"]),
                         rollouts.finish_reasons[i]])
        logger = module.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_table(key="rollouts", columns=COLUMNS, data=rows)
            return None
        root = Path(getattr(logger, "log_dir", None) or module.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / "rollouts.jsonl"
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(COLUMNS, row))) + "\n")
        return path
