"""Stage 1: cold-start SFT on think-before-answer traces (Skywork-R1V3, arXiv 2507.06167, §3.1).

The loss covers the assistant's tokens only; the collator masks prompt, image placeholders and
padding with -100. Validation reports the loss and, from greedy generations, answer accuracy and
the share of well-formed ``<think>…</think>`` responses.

The gradient of an optimizer step is that of the mean over every target token of the step: all
micro-batches of the accumulation window, on all ranks. Averaging each micro-batch's own mean
instead (Lightning's default) weighs a short row's tokens more, and then the update depends on how
a batch is split (rows of 133 and 14 targets: 9.5x). The HF Trainer and TRL normalise the same way
(``num_items_in_batch``, ``average_tokens_across_devices``).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torchmetrics import MeanMetric

from r1v3.backbone import LoadConfig
from r1v3.chat import parse_response
from r1v3.logprobs import gather_logprobs
from r1v3.lora import LoraConfig
from r1v3.errors import UserError
from r1v3.rewards.accuracy import is_correct
from r1v3.rl import packing
from r1v3.rl.head import head_bypassed, head_logprobs
from r1v3.rl.prefix import whole_rows_output
from r1v3.stages.base import OptimizerConfig, R1V3Module


class SFTStage(R1V3Module):
    collate_mode = "sft"

    def __init__(
        self,
        model_path: str,
        trainable: Sequence[str] = ("llm", "connector"),
        optimizer: OptimizerConfig = OptimizerConfig(),
        load: LoadConfig = LoadConfig(),
        max_new_tokens: int = 64,
        export_dir: str | None = None,
        val_generate: bool = True,
        lora: LoraConfig = LoraConfig(),
        logits_chunk: int | None = None,
    ):
        """Cold-start supervised fine-tuning.

        Args:
            model_path: HF model directory or hub id (image-text-to-text model + processor).
            trainable: Module groups that train: any of ``vision``, ``connector``, ``llm``.
            optimizer: Optimizer and schedule settings.
            load: How the backbone loads: dtype, attention kernel, remote code, module groups for
                unknown families, gradient checkpointing.
            max_new_tokens: Generation budget for validation and prediction.
            export_dir: Where to save an HF-format checkpoint when training ends.
            val_generate: Generate at validation to report accuracy and format rate.
            lora: LoRA adapters (peft) on chosen groups, e.g. ``{groups: [llm]}`` with
                ``trainable: [connector]``; the export is then merged, with the adapter beside it.
            logits_chunk: Compute the loss from the final hidden states of the target tokens,
                this many at a time, so the [rows, tokens, vocabulary] logits never exist at once.
                0: the model's own loss over whole logits. None: 128 for vocabularies of 32k
                entries or more (real checkpoints), else 0. Not under FSDP yet
                (docs/performance.md, "Chunked log-probs").
        """
        super().__init__(model_path, trainable, optimizer, load, max_new_tokens, export_dir, lora)
        if logits_chunk is not None and logits_chunk < 0:
            raise UserError(f"logits_chunk must be >= 0 (0: whole logits, None: by vocabulary size), "
                        f"got {logits_chunk}")
        self.logits_chunk = logits_chunk
        self.val_generate = val_generate
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_format = MeanMetric()
        self._micro_tokens = 0  # target tokens of the micro-batch in flight
        self._window_tokens = 0  # target tokens of this accumulation window, on this rank

    def supervised_loss(self, batch: dict) -> torch.Tensor:
        """Mean NLL over the batch's target tokens."""
        chunk = self.logits_chunk
        if not (chunk or packing.enabled(self.model)):
            return self(batch["inputs"], batch["images"], labels=batch["labels"], use_cache=False).loss
        with head_bypassed(self.model) if chunk else contextlib.nullcontext() as head:  # ``.logits``: hidden states
            out = whole_rows_output(self.model, batch["inputs"], batch["images"])
        targets = batch["labels"][:, 1:]
        scored = targets != -100  # only the target positions meet the head: the prompt's never do
        if chunk:
            logp, _ = head_logprobs(out[:, :-1][scored][None], head, targets[scored][None], 1.0, (), chunk,
                                    with_entropy=False)
        else:
            logp = gather_logprobs(out[:, :-1][scored], targets[scored])
        return -logp.mean()

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # ``loss`` is this micro-batch's token mean over k (Lightning divides by the accumulation
        # window k), and the strategy averages gradients over the W ranks. Re-weighted by its
        # target tokens n, the step's gradient becomes Σ ∇(token sums) / (k·W), which
        # ``on_before_optimizer_step`` turns into the token mean once the window's total is known.
        # Without accumulation the total is known now, so the weight is exact here already (and
        # ``optimizer.in_backward``, which steps inside this backward, sees the final gradient).
        n = self._micro_tokens
        k, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        if k == 1:
            total = self.trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="sum") \
                if world > 1 else n
            weight = n * world / max(float(total), 1.0)
        else:
            self._window_tokens += n
            weight = float(n)
        super().backward(loss * weight, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        k, window = self.trainer.accumulate_grad_batches, self._window_tokens
        self._window_tokens = 0
        if k > 1:  # every rank joins the reduce, even one whose window held no target token
            world = self.trainer.world_size
            total = float(self.trainer.strategy.reduce(torch.tensor(float(window), device=self.device),
                                                       reduce_op="sum")) if world > 1 else window
            scale = k * world / max(total, 1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        super().on_before_optimizer_step(optimizer)

    def training_step(self, batch: dict, batch_idx: int):
        self.count_skips(batch)
        # Returning None makes Lightning skip backward and the step; all ranks decide together.
        if not self.all_ranks(batch.get("inputs") is not None):  # every sample of a batch was bad
            return None
        loss = self.supervised_loss(batch)
        n = batch["inputs"]["input_ids"].shape[0]
        router = self.router_aux_loss()
        if router is not None:
            self.log("train/router_aux_loss", router.detach(), batch_size=n)
            loss = loss + router
        if not self.all_ranks(bool(torch.isfinite(loss))):
            if not torch.isfinite(loss):
                self.skip_nonfinite("loss")
            return None
        self._micro_tokens = target_tokens(batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        self.log_throughput(int(batch["inputs"]["attention_mask"].sum()))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        if batch.get("inputs") is None:
            return
        self.val_loss.update(self.supervised_loss(batch), weight=target_tokens(batch["labels"]))
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


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal LM loss scores: label t is predicted at position t-1, so the first column
    never counts (transformers shifts the labels the same way)."""
    return int((labels[:, 1:] != -100).sum())
