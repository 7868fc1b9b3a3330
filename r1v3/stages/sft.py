"""Stage 1: cold-start SFT on think-before-answer traces (Skywork-R1V3, arXiv 2507.06167, §3.1).

The loss covers the assistant's tokens only; the collator masks prompt, image placeholders and
padding with -100. Validation reports the loss and, from greedy generations, answer accuracy and
the share of well-formed ``<think>…</think>`` responses.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchmetrics import MeanMetric

from r1v3.chat import parse_response
from r1v3.rewards.accuracy import is_correct
from r1v3.stages.base import OptimizerConfig, R1V3Module


class SFTStage(R1V3Module):
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
        val_generate: bool = True,
    ):
        """Cold-start supervised fine-tuning.

        Args:
            model_path: HF model directory or hub id (image-text-to-text model + processor).
            trainable: Module groups that train: any of ``vision``, ``connector``, ``llm``.
            optimizer: Optimizer and schedule settings.
            dtype: Dtype the weights load in (``float32``, ``bfloat16``); autocast is the
                trainer's ``precision``.
            attn_implementation: ``sdpa`` (default), ``eager``, or ``flash_attention_2`` (CUDA +
                flash-attn only).
            trust_remote_code: Allow the checkpoint's own Python code (off unless you ask).
            groups: Module groups as parameter-name prefixes, for families r1v3 does not know.
            gradient_checkpointing: Recompute activations in the backward pass to save memory.
            max_new_tokens: Generation budget for validation and prediction.
            export_dir: Where to save an HF-format checkpoint when training ends.
            val_generate: Generate at validation to report accuracy and format rate.
        """
        super().__init__(model_path, trainable, optimizer, dtype, attn_implementation,
                         trust_remote_code, groups, gradient_checkpointing, max_new_tokens, export_dir)
        self.val_generate = val_generate
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_format = MeanMetric()

    def supervised_loss(self, batch: dict) -> torch.Tensor:
        return self(batch["inputs"], batch["images"], labels=batch["labels"], use_cache=False).loss

    def training_step(self, batch: dict, batch_idx: int):
        self.count_skips(batch)
        # Returning None makes Lightning skip backward and the step; all ranks decide together.
        if not self.all_ranks(batch.get("inputs") is not None):  # every sample of a batch was bad
            return None
        loss = self.supervised_loss(batch)
        if not self.all_ranks(bool(torch.isfinite(loss))):
            if not torch.isfinite(loss):
                self.skip_nonfinite("loss")
            return None
        n = batch["inputs"]["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        self.log_throughput(int(batch["inputs"]["attention_mask"].sum()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        if batch.get("inputs") is None:
            return
        n = batch["inputs"]["input_ids"].shape[0]
        self.val_loss.update(self.supervised_loss(batch), weight=n)
        if self.val_generate:
            _, texts = self.generate(batch["prompt"], batch["images"])
            meta = batch["meta"]
            for text, answer, options in zip(texts, meta["answer"], meta["options"]):
                self.val_accuracy.update(float(is_correct(text, answer, options)))
                self.val_format.update(float(parse_response(text).well_formed))

    def _log_eval(self, prefix: str) -> None:
        if self.val_loss.update_count:
            self.log(f"{prefix}/loss", self.val_loss.compute(), prog_bar=True)
        if self.val_generate and self.val_accuracy.update_count:
            self.log(f"{prefix}/accuracy", self.val_accuracy.compute(), prog_bar=True)
            self.log(f"{prefix}/format_rate", self.val_format.compute())
        for metric in (self.val_loss, self.val_accuracy, self.val_format):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: dict, batch_idx: int):
        if batch.get("inputs") is None:
            return []
        _, texts = self.generate(batch["prompt"], batch["images"])
        return [{"id": i, "response": t, "answer": a, "correct": is_correct(t, a, o)}
                for i, t, a, o in zip(batch["meta"]["id"], texts, batch["meta"]["answer"], batch["meta"]["options"])]
