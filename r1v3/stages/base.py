"""What every stage shares: the backbone, its freeze plan, the optimizer and schedule, per-token
log-probs, greedy generation, skip accounting and HF export."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from r1v3 import backbone as bb
from r1v3.logprobs import gather_logprobs

log = logging.getLogger(__name__)


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Args:
        name: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes; works on CPU too).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay.
        betas: Adam betas.
        warmup_ratio: Share of the total steps spent warming up linearly.
        schedule: ``cosine`` decays to zero after warm-up; ``constant`` holds the peak.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"


class R1V3Module(LightningModule):
    """Base of the r1v3 stages. Subclasses implement the steps."""

    collate_mode = "sft"

    def __init__(
        self,
        model_path: str,
        trainable: Sequence[str] = ("llm", "connector"),
        optimizer: OptimizerConfig = OptimizerConfig(),
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        groups: Mapping[str, list[str]] | None = None,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 64,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_path = model_path
        self.trainable = list(trainable)
        self.optim = optimizer or OptimizerConfig()
        self.max_new_tokens = max_new_tokens
        self.export_dir = export_dir
        # The processor is needed before configure_model: the datamodule collates with it.
        self.processor = bb.load_processor(model_path, trust_remote_code)
        self.backbone: bb.Backbone | None = None
        self.model: torch.nn.Module | None = None
        self._skipped: Counter = Counter()
        self._step_started: float | None = None

    # -- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.backbone = bb.load_backbone(
            self.model_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
            trust_remote_code=hp.trust_remote_code, groups=hp.groups, device=str(self.device))
        self.backbone.processor = self.processor
        self.model = self.backbone.model.train()  # from_pretrained returns eval mode
        counts = bb.apply_freeze_plan(self.backbone, self.trainable)
        for group, c in counts.items():
            rank_zero_info(f"[r1v3] {group:<9} trainable {c['trainable']:>12,} / {c['total']:>12,} params")
        if hp.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.23
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model.config.use_cache = False

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def forward(self, inputs: dict, images: dict, **kwargs):
        return self.model(**inputs, **images, **kwargs)

    def token_logprobs(self, inputs: dict, images: dict, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[t] | prefix) for every position t ≥ 1; position 0 gets 0."""
        logits = self(inputs, images, use_cache=False).logits
        out = torch.zeros_like(targets, dtype=logits.dtype)
        out[:, 1:] = gather_logprobs(logits[:, :-1], targets[:, 1:])
        return out

    @torch.no_grad()
    def generate(self, prompt: dict, images: dict, max_new_tokens: int | None = None,
                 **sampling) -> tuple[torch.Tensor, list[str]]:
        """Completions (ids after the prompt, and decoded text) for left-padded prompts."""
        was_training = self.model.training
        self.model.eval()
        sampling.setdefault("do_sample", False)
        out = self.model.generate(**prompt, **images, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, **sampling)
        self.model.train(was_training)
        completion = out[:, prompt["input_ids"].shape[1]:]
        return completion, self.tokenizer.batch_decode(completion, skip_special_tokens=True)

    # -- data accounting -------------------------------------------------------------------------
    def count_skips(self, batch: dict) -> None:
        """Accumulate samples the data pipeline dropped (bad files, over-long prompts) and log them."""
        skipped = batch.get("skipped") or {}
        if skipped:
            self._skipped.update(skipped)
        if self._skipped:
            self.log("data/skipped", float(sum(self._skipped.values())), reduce_fx="sum", sync_dist=False)

    def on_train_epoch_end(self) -> None:
        if self._skipped:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(self._skipped.items()))
            rank_zero_warn(f"[r1v3] skipped {sum(self._skipped.values())} bad samples so far ({detail})")

    @property
    def skipped(self) -> dict:
        return dict(self._skipped)

    # -- throughput ------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def log_throughput(self, tokens: int) -> None:
        if self._step_started:
            self.log("train/tokens_per_s", tokens / max(time.perf_counter() - self._step_started, 1e-9))

    # -- optimization ----------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise bb.BackboneError(f"freeze plan {self.trainable} leaves nothing to train")
        cfg = self.optim
        if cfg.name == "adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(cfg.warmup_ratio * total)
        if cfg.schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export ----------------------------------------------------------------------------------
    def export_hf(self, out: str | Path) -> Path:
        """Save model + processor in HF format, loadable by the next stage or plain transformers."""
        out = Path(out)
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out

    def on_train_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            rank_zero_info(f"[r1v3] exported HF checkpoint to {self.export_hf(self.export_dir)}")
