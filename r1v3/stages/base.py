"""What every stage shares: the backbone, its freeze plan, the optimizer and schedule, per-token
log-probs, greedy generation, skip accounting and HF export."""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from r1v3 import backbone as bb
from r1v3 import fsdp, processors
from r1v3 import lora as lora_adapters
from r1v3.encoding import PromptEncoder
from r1v3.logprobs import gather_logprobs
from r1v3.moe import RouterAuxLoss, write_released_layout
from r1v3.rl import packing
from r1v3.rl.rollout import own_generation_config
from r1v3.stages.health import DivergedError, NonFiniteError, StageHealth  # noqa: F401 - re-exported
from r1v3.stages.in_backward import OptimizerInBackward

log = logging.getLogger(__name__)

# bench/logits_memory.py, InternVL small, 16 completions × 128 tokens: at a 151k vocabulary chunks of
# 128 positions cut the update's peak from 4.8 GB to 0.6 GB and its time to 0.69×; at 2k the
# difference (1.00× the time, 0.93× the memory) is within this machine's noise, so small
# vocabularies keep whole logits.
AUTO_LOGITS_CHUNK, AUTO_CHUNK_VOCAB = 128, 32_768


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
        in_backward: Update each parameter inside the backward pass and free its gradient at
            once, so the gradients never all exist together (4 bytes per fp32 parameter saved).
            Stages with one backward per step only (SFT, connector): no gradient accumulation,
            no ``gradient_clip_val``, not under FSDP.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    in_backward: bool = False


# Lightning checkpoints keep the stage's hyperparameters; allow-listing this plain config class lets
# them load with torch.load(weights_only=True), the default since torch 2.6.
torch.serialization.add_safe_globals([OptimizerConfig])


def rng_state() -> dict:
    """Python, NumPy and torch CPU RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class R1V3Module(StageHealth, LightningModule):
    """Base of the r1v3 stages. Subclasses implement the steps."""

    collate_mode = "sft"

    def __init__(
        self,
        model_path: str,
        trainable: Sequence[str] = ("llm", "connector"),
        optimizer: OptimizerConfig = OptimizerConfig(),
        load: bb.LoadConfig = bb.LoadConfig(),
        max_new_tokens: int = 64,
        export_dir: str | None = None,
        lora: lora_adapters.LoraConfig = lora_adapters.LoraConfig(),
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_path = model_path
        self.trainable = list(trainable)
        self.lora = lora_adapters.as_config(lora)
        self.optim = optimizer or OptimizerConfig()
        # A checkpoint's hparams may hold the settings as a plain dict.
        self.load_config = load if isinstance(load, bb.LoadConfig) else bb.LoadConfig(**(load or {}))
        if self.lora.enabled:  # before a long load
            lora_adapters.check_plan(self.lora, self.trainable, list(self.load_config.groups or bb.GROUP_NAMES))
        self.max_new_tokens = max_new_tokens
        self.export_dir = export_dir
        # The processor is needed before configure_model: the datamodule collates with it.
        self.processor = bb.load_processor(model_path, self.load_config.trust_remote_code)
        self.family = processors.model_type(model_path)  # picks the image settings (r1v3.encoding.image_kwargs)
        self.backbone: bb.Backbone | None = None
        self.router_aux: RouterAuxLoss | None = None
        self.model: torch.nn.Module | None = None
        self._skipped: Counter = Counter()
        self._step_started: float | None = None

    # -- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # built before fit (tests, demo): the strategy may still shard it
            fsdp.configure_sharding(self)
            self.check_logits_chunk()
            self.configure_packing(self.model)
            return
        fsdp.check_strategy(self._trainer.strategy if self._trainer else None)  # before a long load
        load = self.load_config
        self.backbone = bb.load_backbone(
            self.model_path, dtype=load.dtype, attn_implementation=load.attn_implementation,
            trust_remote_code=load.trust_remote_code, groups=load.groups, device=str(self.device),
            on_meta=fsdp.loads_sharded(self._trainer.strategy if self._trainer else None))
        self.backbone.processor = self.processor
        self.model = self.backbone.model.train()  # from_pretrained returns eval mode
        counts = bb.apply_freeze_plan(self.backbone, self.trainable)
        if self.lora.enabled:  # adapters go in before checkpointing and sharding wrap the layers
            counts = lora_adapters.attach(self.backbone, self.lora, self.trainable)
            rank_zero_info(f"[r1v3] LoRA r={self.lora.r} alpha={self.lora.alpha:g} on {self.lora.groups}")
        for group, c in counts.items():
            rank_zero_info(f"[r1v3] {group:<9} trainable {c['trainable']:>12,} / {c['total']:>12,} params")
        self.router_aux = RouterAuxLoss(self.model, load.router_aux_loss_coef)
        if self.router_aux.coef:
            rank_zero_info(f"[r1v3] router load-balancing loss on, coefficient {self.router_aux.coef:g}")
        if load.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.23
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model.config.use_cache = False
        fsdp.configure_sharding(self)  # FSDP2 when the trainer's strategy is a ModelParallelStrategy
        self.check_logits_chunk()
        self.configure_packing(self.model)

    def configure_packing(self, model: torch.nn.Module) -> None:
        """Padding-free training forwards (``load.padding_free``), where the model's attention
        allows them (r1v3.rl.packing); a model that does not keeps padded batches, said once.
        ``load.compile`` then compiles the decoder layers for those forwards."""
        load = self.load_config
        if load.padding_free and not packing.enabled(model) and not packing.enable(model):
            config = packing.language_config(model)
            rank_zero_info(f"[r1v3] padded batches: padding_free needs SDPA or flash-attn 2 attention without a "
                           f"sliding window (this model: {config._attn_implementation})")
        if load.compile:
            if not packing.enabled(model):
                raise bb.BackboneError("load.compile compiles the padding-free forwards: it needs load.padding_free "
                                       "and a model on SDPA or flash-attn 2 attention")
            rank_zero_info(f"[r1v3] torch.compile on {packing.compile_layers(model)} decoder layers "
                           "(the first training step compiles)")

    logits_chunk: int | None = 0  # stages that score from hidden states set it (r1v3.rl.head)

    def check_logits_chunk(self) -> None:
        """Resolve ``logits_chunk``: None picks ``AUTO_LOGITS_CHUNK`` positions for a vocabulary of
        ``AUTO_CHUNK_VOCAB`` entries or more, else whole logits. Chunked scoring calls the head
        outside the model's forward, where FSDP has already resharded it, so sharded runs keep
        whole logits for now (docs/performance.md, "Chunked log-probs")."""
        chosen = self.logits_chunk
        if chosen is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            chosen = AUTO_LOGITS_CHUNK if vocab >= AUTO_CHUNK_VOCAB and not fsdp.is_sharded(self.model) else 0
        elif chosen and fsdp.is_sharded(self.model):
            rank_zero_warn("[r1v3] logits_chunk is not supported under FSDP yet: whole logits are used")
            chosen = 0
        self.logits_chunk = chosen
        self.model.r1v3_logits_chunk = chosen  # read by r1v3.rl.scoring

    def router_aux_loss(self) -> torch.Tensor | None:
        """The weighted router load-balancing loss of the training forwards since the last call
        (mixture-of-experts models with the loss on), else None."""
        return self.router_aux.pop() if self.router_aux is not None else None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def prompt_encoder(self) -> PromptEncoder:
        """Encodes prompts as the data module does: the same resolution and tiling settings (the
        processor's defaults when no data module is attached)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        options = getattr(datamodule, "collate_options", None) or {}
        return PromptEncoder(self.processor, family=self.family,
                             **{k: options[k] for k in ("min_pixels", "max_pixels", "max_tiles") if k in options})

    @property
    def image_token_check(self):
        """The model's image-token/feature count check for the collator (None before the model)."""
        return bb.image_token_check(self.model.config) if self.model is not None else None

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
        if fsdp.synced_generate(self.model):  # every decoding step of a sharded model is a collective
            sampling.setdefault("synced_gpus", True)
        with own_generation_config(self.model, self.tokenizer):  # the checkpoint's penalties do not apply
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

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank. Sharded forwards and backwards are collectives,
        so a rank may only skip a step if all ranks skip it; otherwise the others wait forever."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=True))

    # -- exact resume --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores weights, optimizer, scheduler, loops and the data position (the data
        # module's state_dict), but not the RNG streams: sampling, dropout and shuffles after a
        # resume must draw what the uninterrupted run would have drawn.
        state = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()  # each rank draws its own stream
            torch.distributed.all_gather_object(states, state)
            state = {"per_rank": states}
        checkpoint["r1v3_rng"] = state
        self.save_health(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("r1v3_rng")
        if state and "per_rank" in state:
            ranks = state["per_rank"]  # a resume on another world size keeps rank 0's stream for all
            state = ranks[self.global_rank] if self.global_rank < len(ranks) else ranks[0]
        self._rng_to_restore = state
        self.load_health(checkpoint)

    def on_train_start(self) -> None:
        # Restored here rather than at load time: fit set-up between loading and the first step
        # (dataloader workers, the rollout engine) may still consume random numbers.
        state = getattr(self, "_rng_to_restore", None)
        if state is not None:
            set_rng_state(state)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Test hook for crash-resume tests: die like a preempted node, right after step k's
        # checkpoint callbacks have run (callbacks' hooks run before the module's).
        kill_at = os.environ.get("R1V3_KILL_AT_STEP")
        if kill_at and self.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

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

            make = partial(bnb.optim.AdamW8bit, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        else:
            make = partial(torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if cfg.in_backward:
            self.check_in_backward()
            opt = OptimizerInBackward(params, make)
        else:
            opt = make(params)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(cfg.warmup_ratio * total)
        if cfg.schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def check_in_backward(self) -> None:
        """Refuse the settings under which updating inside the backward would change the maths."""
        trainer = self.trainer
        reasons = []
        if not self.automatic_optimization:
            reasons.append("this stage accumulates micro-batches and clips the global gradient norm itself")
        if trainer.gradient_clip_val:
            reasons.append("trainer.gradient_clip_val needs every gradient at once")
        if trainer.accumulate_grad_batches > 1:
            reasons.append("trainer.accumulate_grad_batches > 1 needs gradients kept across backwards")
        if fsdp.is_sharded(self.model):
            reasons.append("FSDP sets reduced gradients outside autograd's gradient hooks")
        if reasons:
            raise bb.BackboneError("optimizer.in_backward cannot be used here: " + "; ".join(reasons))

    # -- export ----------------------------------------------------------------------------------
    def export_hf(self, out: str | Path) -> Path:
        """Save model + processor in HF format, loadable by the next stage or plain transformers."""
        out = Path(out)
        if lora_adapters.has_adapters(self.model):
            return self.export_with_adapter(out)
        if fsdp.is_sharded(self.model):  # a collective: every rank gathers, rank 0 writes
            return fsdp.export_sharded(self, out)
        self.model.save_pretrained(out)
        write_released_layout(out)
        processors.save_processor(self.processor, out)
        return out

    def export_with_adapter(self, out: Path) -> Path:
        """Under LoRA: the merged model (W + scale·B·A) in ``out``, which plain transformers loads,
        and the adapter alone in ``out/adapter`` (peft's format, base: ``model_path``). Under FSDP2
        each rank merges and writes its own rows, as the plain sharded export does; otherwise
        every tensor is merged whole in turn, and only the writing rank keeps it."""
        sharded = fsdp.is_sharded(self.model)
        writer = not sharded or torch.distributed.get_rank() == 0

        def gathered() -> dict[str, torch.Tensor]:
            return {name: tensor.cpu() for name, tensor in lora_adapters.model_weights(self.model) if writer}
        if sharded:
            fsdp.export_sharded(self, out, gather=gathered,
                                params=lora_adapters.merged_shards(self.model) if fsdp.is_fsdp2(self.model) else None)
        else:
            self.model.save_pretrained(out, state_dict=gathered())
            write_released_layout(out)
            processors.save_processor(self.processor, out)
        lora_adapters.save_adapter(self.model, out / "adapter", base_model=str(self.model_path), write=writer)
        if sharded:
            torch.distributed.barrier()
        return out

    def on_train_end(self) -> None:
        if self.export_dir and (self.trainer.is_global_zero or fsdp.is_sharded(self.model)):
            rank_zero_info(f"[r1v3] exported HF checkpoint to {self.export_hf(self.export_dir)}")
