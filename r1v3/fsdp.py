"""Sharded training: FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy, and an FSDP1
configuration for GPU users.

FSDP2 shards every parameter as a DTensor over the data-parallel ranks; each transformer block is
one all-gather/reduce-scatter unit. It runs on CPU with gloo (docs/design.md §2), which is how the tests
exercise it; FSDP1 (``FSDPStrategy``) needs CUDA.

Every forward/backward of a sharded module is a collective: all ranks must run the same number of
them, in the same order. The stages keep that invariant (see GRPOStage.update).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from r1v3.errors import BackboneError
from r1v3.moe import write_released_layout
from r1v3.processors import save_processor
from r1v3.distributed import is_fsdp2, is_sharded, max_over_ranks, synced_generate, world_size  # noqa: F401

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over all processes; no tensor parallelism.

    Lightning's ModelParallelStrategy runs on CPU as it is (gloo backend, a CPU device mesh); the
    only additions here are r1v3's sharding options and crash-safe checkpoint directories.

    Args:
        activation_checkpointing: Recompute each block's activations in backward (the model's own
            gradient checkpointing; same as the stage's ``gradient_checkpointing``).
        mixed_precision: ``bf16`` all-gathers parameters and computes in bfloat16 and reduces
            gradients in float32, keeping float32 master weights and optimizer states; ``none``
            computes in the dtype the weights were loaded in.
        cpu_offload: Keep sharded parameters, gradients and optimizer states in host memory; the
            optimizer step runs on the CPU (torch ``CPUOffloadPolicy``). A no-op on a CPU run.
        reshard_after_forward: Free gathered block parameters after forward and gather them
            again in backward (less memory, one more all-gather per block).
        save_distributed_checkpoint: Checkpoints are directories with one shard file per rank
            (written atomically); ``False`` gathers one full file on rank 0 instead.
        process_group_backend: ``nccl``/``gloo``; default: what the device needs.
        timeout: Collective timeout.
    """

    strategy_name = "r1v3_fsdp2"

    def __init__(
        self,
        activation_checkpointing: bool = False,
        mixed_precision: Literal["bf16", "none"] = "none",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if mixed_precision not in ("bf16", "none"):
            raise BackboneError(f"mixed_precision must be 'bf16' or 'none', not {mixed_precision!r}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # The parent's "auto" means one data-parallel group per node (it expects tensor parallelism
        # inside a node); here every process is a data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Write the checkpoint directory beside its destination, then swap it into place, so a crash
        mid-write leaves the previous checkpoint intact rather than a mix of two steps."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():  # left by a crashed save
            _remove(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shard file is complete
        if self.is_global_zero:
            swap_into_place(partial, path)
        self.barrier()


def swap_into_place(new: Path, dest: Path) -> None:
    """Make ``new`` appear at ``dest`` in one step, then delete what was there.

    A directory cannot be renamed over a non-empty one, so on Linux the two are exchanged
    atomically with ``renameat2(RENAME_EXCHANGE)`` (man 2 rename). Where that is unavailable (other
    kernels, NFS) the old one is moved aside first: a crash between the two renames leaves ``dest``
    missing, never half-written, and the previous checkpoint at ``.<name>.old``."""
    if not dest.exists():
        os.rename(new, dest)
        return
    if dest.is_dir() and _exchange(new, dest):
        _remove(new)  # now holds the previous checkpoint
        return
    old = dest.with_name(f".{dest.name}.old")
    _remove(old)
    os.rename(dest, old)
    os.rename(new, dest)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    RENAME_EXCHANGE, AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class FSDP1Strategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, CUDA only) wrapping each block the model names in its
    ``_no_split_modules`` as one FSDP unit. Lightning's default ``use_orig_params=True`` lets frozen
    groups share a unit with trainable ones. Other FSDPStrategy arguments pass through.

    Args:
        checkpoint_blocks: Recompute each block's activations in backward (the model's own
            gradient checkpointing, so parameter names stay unchanged).
    """

    strategy_name = "r1v3_fsdp1"

    def __init__(self, checkpoint_blocks: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_blocks = checkpoint_blocks

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        hf_model = getattr(self.lightning_module, "model", None)
        if hf_model is not None and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(m) for _, m in sharding_units(hf_model)})
        if hf_model is not None and self.checkpoint_blocks:
            enable_activation_checkpointing(hf_model)
        return super()._setup_model(model)


def check_strategy(strategy: Any) -> None:
    """Refuse configurations that cannot work, with a message saying what to use instead."""
    if strategy is None:
        return
    if isinstance(strategy, FSDPStrategy) and strategy.root_device.type != "cuda":
        raise BackboneError(f"FSDP1 (FSDPStrategy) needs CUDA GPUs; this run is on {strategy.root_device.type}. "
                            "Use FSDP2: --config configs/strategies/fsdp2.yaml")
    if isinstance(strategy, ModelParallelStrategy) and strategy._tensor_parallel_size != 1:
        raise BackboneError("r1v3 shards with FSDP2 only: set tensor_parallel_size=1 (or use r1v3.fsdp.FSDP2Strategy)")


def block_classes(model: torch.nn.Module) -> set[type]:
    """Classes of the model's transformer blocks, from the ``_no_split_modules`` HF models declare."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise BackboneError(f"{type(model).__name__} declares no _no_split_modules present in the model, so r1v3 "
                            "cannot tell its transformer blocks apart for sharding")
    return classes


def sharding_units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules that each become one FSDP unit (an all-gather in forward, a reduce-scatter in
    backward), in module order; the root takes what they leave. Each transformer block is one, and
    in a mixture-of-experts model so is each block's sparse MoE layer (router + experts). That
    layer holds almost all of a block's parameters (Qwen3-VL-30B-A3B: 604M of 623M, ``r1v3
    shapes``); as its own unit, its all-gather is prefetched while attention computes instead of
    delaying it, and it is the unit an expert-parallel layout would place apart (docs/models.md)."""
    from r1v3.moe import is_expert_block

    classes = block_classes(model)
    return [(name, m) for name, m in model.named_modules() if type(m) in classes or is_expert_block(m)]


def shard_backbone(model: torch.nn.Module, mesh, *, mixed_precision: str = "none", cpu_offload: bool = False,
                   reshard_after_forward: bool = True, device: torch.device | str | None = None) -> torch.nn.Module:
    """``fully_shard`` each unit (decoder layer, vision block, MoE layer), then the root, over the 1-D
    ``mesh``. A model built on the meta device (``load_backbone(on_meta=True)``) then gets its
    shards allocated on ``device`` (default: the mesh's device type) and read from the checkpoint.

    Sharding is bottom-up: a ``fully_shard`` call takes the parameters not yet claimed by a call on
    a submodule (torch docs of ``fully_shard``), so the root unit holds embeddings, norms, the
    connector and the head. Frozen parameters are sharded like the rest and get no gradient.
    """
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    offload = OffloadPolicy()
    if cpu_offload:
        if mesh.device_type == "cpu":
            log.info("cpu_offload is a no-op for a run on CPU")
        else:
            offload = CPUOffloadPolicy()
    for _, unit in reversed(sharding_units(model)):  # post-order: a unit nested in another is claimed first
        if any(True for _ in unit.parameters()) and not isinstance(unit, FSDPModule):
            fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    if hasattr(model, "_supports_mm_encoder_outputs"):
        # transformers 5 `generate` encodes the images by calling the base model's
        # get_image_features directly, outside the root module's forward, where FSDP2 has not
        # gathered the root's parameters (mixed Tensor/DTensor error). Without that shortcut the
        # images are encoded inside the prefill forward, as in training.
        model._supports_mm_encoder_outputs = lambda: False
    if "_r1v3_checkpoint_keys" in model.__dict__:  # built on the meta device: read this rank's rows
        from r1v3.sharded_load import materialize

        largest = materialize(model, device or mesh.device_type)
        rank_zero_info(f"[r1v3] sharded load: each rank read its own rows (largest slice {largest / 2**20:.1f} MB)")
    return model


def loads_sharded(strategy: Any) -> bool:
    """Whether a stage under ``strategy`` builds its model on the meta device and reads each rank's
    shard from the checkpoint (FSDP2 over several processes) instead of loading it whole per rank."""
    return (isinstance(strategy, ModelParallelStrategy) and strategy.world_size > 1
            and getattr(strategy, "sharded_load", True))


def configure_sharding(module) -> None:
    """Called by R1V3Module.configure_model after the freeze plan: shard ``module.model`` when the
    trainer's strategy is a ModelParallelStrategy (options from FSDP2Strategy, defaults otherwise)."""
    strategy = module._trainer.strategy if module._trainer is not None else None
    check_strategy(strategy)
    if not isinstance(strategy, ModelParallelStrategy) or is_sharded(module.model):
        return
    opts = {k: getattr(strategy, k) for k in ("mixed_precision", "cpu_offload", "reshard_after_forward")
            if hasattr(strategy, k)}
    # HF VLMs return image_hidden_states as a view; r1v3 never modifies model outputs in place,
    # which is what this warning (raised on every forward) is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if getattr(strategy, "activation_checkpointing", False) and not module.load_config.gradient_checkpointing:
        enable_activation_checkpointing(module.model)
    shard_backbone(module.model, strategy.device_mesh["data_parallel"], device=strategy.root_device, **opts)
    if strategy.world_size > 1:
        keep_vision_in_step(module.model, module.processor)
    if opts.get("mixed_precision") == "bf16":
        # MixedPrecisionPolicy casts float32 shards for compute; kept in bfloat16, an AdamW update
        # of lr 1e-6 would mostly round away. Upcasting after sharding costs each rank only its shard.
        module.model.float()


def shard_reference(model: torch.nn.Module, module, cpu_offload: bool = False) -> torch.nn.Module:
    """Shard a frozen reference copy of ``module.model`` as the policy is sharded: the same mesh
    and compute precision, so each rank holds 1/W of it, plus the blank-image pass that keeps
    its vision collectives in step on ranks without images."""
    strategy = module.trainer.strategy
    shard_backbone(model, strategy.device_mesh["data_parallel"],
                   mixed_precision=getattr(strategy, "mixed_precision", "none"), cpu_offload=cpu_offload,
                   reshard_after_forward=True, device=strategy.root_device)
    if strategy.world_size > 1:
        keep_vision_in_step(model, module.processor)
    return model


def keep_vision_in_step(model: torch.nn.Module, processor: Any) -> None:
    """Run the vision tower on forwards without images, at the point where it would have run.

    A batch without images skips the vision tower, whose blocks are FSDP units, so that rank's
    all-gathers would pair with another rank's vision all-gathers and hang (docs/design.md §3). For such a
    forward (any training forward, or a generation prefill) the vision tower encodes one blank
    image just before the language model runs, and 0 × its output joins the language model's
    input, so its backward (gradient reduce-scatters) runs as well.
    """
    from PIL import Image

    from r1v3.chat import render_prompt
    from r1v3.encoding import PromptEncoder

    base = getattr(model, "base_model", model)
    language_model = getattr(base, "language_model", None)
    if language_model is None or not hasattr(base, "get_image_features"):
        log.warning("%s: cannot locate its language model; batches without images may hang", type(model).__name__)
        return
    _, blank = PromptEncoder(processor).encode_prompts(
        [render_prompt(processor, "<image>", 1)], [[Image.new("RGB", (32, 32), (255, 255, 255))]])
    pending = {}

    def note(_module, _args, kwargs):
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        pending["blank"] = kwargs.get("pixel_values") is None and prefill

    def encode_blank(_module, args, kwargs):
        if not pending.pop("blank", False) or kwargs.get("inputs_embeds") is None:
            return None
        device = kwargs["inputs_embeds"].device
        features = base.get_image_features(**{k: v.to(device) for k, v in blank.items()})
        zero = sum(t.float().sum() for t in _tensors(features)) * 0.0
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + zero.to(kwargs["inputs_embeds"].dtype)
        return args, kwargs

    model.register_forward_pre_hook(note, with_kwargs=True)
    language_model.register_forward_pre_hook(encode_blank, with_kwargs=True)


def _tensors(out: Any) -> list[torch.Tensor]:
    """Floating tensors in a (nested) model output: ModelOutput, tuple or tensor."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks FSDP2's backward hooks
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 ({} elsewhere). A collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_sharded(module, out: Path, params: dict[str, torch.Tensor] | None = None,
                   gather: Callable[[], dict[str, torch.Tensor]] | None = None) -> Path:
    """HF export of an R1V3Module's sharded model. FSDP2: each rank writes its shards and rank 0
    consolidates them into HF safetensors (torch's ``HuggingFaceStorageWriter``), so no rank
    gathers the model; a checkpoint layout that is not a renaming of the parameters (per-expert
    files) falls back to gathering on rank 0. Rank 0 then writes the config and processor.
    ``params`` (sharded) and ``gather`` (whole, on rank 0) give the weights to write instead of the
    model's own: a LoRA model's merged weights."""
    model = module.model
    if is_fsdp2(model):
        from r1v3.sharded_load import save_sharded

        if save_sharded(model, out, params):
            if torch.distributed.get_rank() == 0:
                model.config.save_pretrained(out)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(out)
                write_released_layout(out)
                save_processor(module.processor, out)
            torch.distributed.barrier()
            return out
        state = gather() if gather else full_state_dict(model)
    elif gather:
        state = gather()
    else:  # FSDP1 state dicts come from the wrapped root (the LightningModule): keys gain "model."
        state = {k.removeprefix("model."): v for k, v in full_state_dict(module.trainer.strategy.model).items()
                 if k.startswith("model.")}
    if torch.distributed.get_rank() == 0:
        model.save_pretrained(out, state_dict=state)
        write_released_layout(out)
        save_processor(module.processor, out)
    torch.distributed.barrier()
    return out
