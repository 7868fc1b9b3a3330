"""LoRA adapters through peft, on chosen module groups, for every stage (docs/lora.md).

peft injects its layers into the model in place (``inject_adapter_in_model``): an adapted linear
``…q_proj`` becomes ``…q_proj.base_layer`` plus ``…q_proj.lora_A/lora_B``. Parameter names keep
their group prefixes, so everything that works by group (freeze plan, FSDP2 units, weight sync,
checkpoints, exact resume) sees one model. peft's ``PeftModel`` wrapper is not used: its
``base_model.model.`` prefix would rename every parameter. Exports use peft's own formats: the
adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained``
reads it), and a merged checkpoint (W + scale·B·A) that plain transformers loads.

A group is either trained fully (the stage's ``trainable``), adapted (``lora.groups``) or frozen;
a frozen group gets no adapter.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from r1v3.distributed import clean_name
from r1v3.errors import BackboneError

ADAPTER = "default"  # peft's name for a model's only adapter
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained spells parameter names


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on chosen module groups.

    Args:
        groups: Module groups that get adapters (``llm``, ``vision``, ``connector``); empty turns
            LoRA off. A group cannot be both adapted and in the stage's ``trainable`` (trained
            fully); groups in neither stay frozen, without adapters.
        r: Adapter rank.
        alpha: Scaling numerator: the update is (alpha / r)·B·A.
        dropout: Dropout on the adapter's input (training only).
        target_modules: Linear layers to adapt inside those groups, by the last part of their name
            (``q_proj``, ``v_proj``, …); empty adapts every linear layer of the groups except the
            output head, like peft's ``all-linear``.
        engine_sync: How the vLLM engine receives the policy. ``auto``: the adapter alone (a few
            MB, vLLM's LoRA path) where the llm group is adapted and the engine supports it, else
            merged weights; ``merged``: always merged weights of the adapted groups.
    """

    groups: list[str] = field(default_factory=list)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    engine_sync: Literal["auto", "merged"] = "auto"

    @property
    def enabled(self) -> bool:
        return bool(self.groups)


# Lightning checkpoints keep the stage's hyperparameters; allow-listing this plain config class lets
# them load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([LoraConfig])


def as_config(value) -> LoraConfig:
    """A stage's ``lora`` argument (the dataclass, or the plain dict a checkpoint's hparams hold)."""
    return value if isinstance(value, LoraConfig) else LoraConfig(**(value or {}))


def check_plan(cfg: LoraConfig, trainable: Sequence[str], known: Sequence[str]) -> None:
    """Refuse an adapter plan that names unknown groups or adapts a group that also trains fully."""
    unknown = [g for g in cfg.groups if g not in known]
    if unknown:
        raise BackboneError(f"lora.groups names unknown groups {unknown}; known: {list(known)}")
    both = [g for g in cfg.groups if g in trainable]
    if both:
        raise BackboneError(f"group(s) {both} are both in `trainable` (trained fully) and in lora.groups "
                            "(adapted): take them out of one of the two")
    if cfg.engine_sync not in ("auto", "merged"):
        raise BackboneError(f"lora.engine_sync must be 'auto' or 'merged', got {cfg.engine_sync!r}")
    if cfg.r < 1:
        raise BackboneError(f"lora.r must be at least 1, got {cfg.r}")
    if not 0 <= cfg.dropout < 1:
        raise BackboneError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")


def target_modules(backbone, cfg: LoraConfig) -> list[str]:
    """Full names of the linear layers that get adapters."""
    model = backbone.model
    head = model.get_output_embeddings()
    wanted = set(cfg.target_modules)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and (module is not head or name.rsplit(".", 1)[-1] in wanted)
             and backbone.group_of(clean_name(name) + ".weight") in cfg.groups
             and (not wanted or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise BackboneError(f"lora: no linear layer of groups {cfg.groups} matches target_modules "
                            f"{cfg.target_modules or 'all'}")
    inputs = model.get_input_embeddings()
    if head is not None and any(model.get_submodule(n) is head for n in names) \
            and getattr(inputs, "weight", None) is head.weight:
        raise BackboneError("lora: this model ties its output head to its input embeddings, so an adapter on the "
                            "head would change both and cannot be merged into one; drop lm_head from "
                            "lora.target_modules")
    return names


def attach(backbone, cfg: LoraConfig, trainable: Sequence[str]) -> dict[str, dict[str, int]]:
    """Inject the adapters, then make exactly the adapters and the fully trained groups require
    grad (peft freezes everything but its adapters). Returns per-group trainable/total counts."""
    # peft imports bitsandbytes, whose CPU backend warns that an optional 4-bit gemm kernel is not
    # installed; r1v3 never runs 4-bit layers, so that line is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    check_plan(cfg, trainable, list(backbone.groups))
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=target_modules(backbone, cfg))
    inject_adapter_in_model(peft_config, backbone.model, adapter_name=ADAPTER)
    backbone.model.r1v3_lora = peft_config  # what save_adapter writes as adapter_config.json
    counts = {}
    for group, params in backbone.group_parameters().items():
        for name, param in params:
            param.requires_grad_(group in trainable or (group in cfg.groups and is_adapter_param(name)))
        counts[group] = {"trainable": sum(p.numel() for _, p in params if p.requires_grad),
                         "total": sum(p.numel() for n, p in params if not is_adapter_param(n))}
    return counts


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def unadapted(name: str) -> str:
    """A parameter's name in the base checkpoint (peft's ``.base_layer`` taken out)."""
    return name.replace(".base_layer.", ".")


def has_adapters(model: torch.nn.Module | None) -> bool:
    return model is not None and getattr(model, "r1v3_lora", None) is not None


def output_head_name(model: torch.nn.Module) -> str:
    """The clean module name of the output head (``lm_head``)."""
    head = model.get_output_embeddings()
    return next(clean_name(name) for name, module in model.named_modules() if module is head)


def adapted_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Clean module name → peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {clean_name(name): module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Forwards inside run the base model: the KL reference, with no second copy of the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # peft makes the adapters trainable again here


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor: a DTensor (FSDP2) is gathered across ranks, a collective."""
    tensor = tensor.detach()
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def delta_weight(layer) -> torch.Tensor:
    """scale·B·A of a LoRA linear, computed in float32 from whole tensors (peft's merge formula
    for ``nn.Linear``; tests/test_lora.py checks the merged model against peft's own)."""
    a = _full(layer.lora_A[ADAPTER].weight).float()
    b = _full(layer.lora_B[ADAPTER].weight).float()
    return (b @ a) * layer.scaling[ADAPTER]


def base_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.nn.Module | None]]:
    """(checkpoint name, parameter, its LoRA layer if it is an adapted weight, else None) for every
    parameter but the adapters' own: the one walk both merges (whole and per shard) take."""
    layers = adapted_layers(model) if has_adapters(model) else {}
    for name, param in model.named_parameters():
        name = clean_name(name)
        if is_adapter_param(name):
            continue
        adapted = ".base_layer." in name and name.endswith(".weight")
        yield unadapted(name), param, layers[name.split(".base_layer.")[0]] if adapted else None


def merged(weight: torch.Tensor, layer) -> torch.Tensor:
    """A whole weight with its adapter merged in, in the weight's dtype."""
    return (weight.float() + delta_weight(layer)).to(weight.dtype)


def model_weights(model: torch.nn.Module, keep=lambda name: True, merge=lambda name: True
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) for each parameter whose checkpoint name (peft's
    ``.base_layer`` taken out) ``keep`` accepts, each adapted weight whose name ``merge`` accepts
    merged with its adapter (the others stay the base weight).
    Adapter tensors themselves are not yielded. Under FSDP2 every tensor is gathered: all ranks
    must iterate in step."""
    for name, param, layer in base_parameters(model):
        if not keep(name):
            continue
        tensor = _full(param)
        yield name, merged(tensor, layer) if layer is not None and merge(name) else tensor


def merged_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name → weight with its adapter merged, each rank merging its own rows of an
    FSDP2-sharded weight: W and B are split by rows alike (dim 0 is the output size of both), so
    a rank's rows of W + scale·B·A need only its rows of B and the whole, small A. A collective
    (A is gathered); a weight whose rows do not line up with B's is merged whole and re-sharded."""
    from torch.distributed.tensor import DTensor

    from r1v3.distributed import as_placed

    out = {}
    for name, param, layer in base_parameters(model):
        weight = param.detach()
        if layer is not None:
            b = layer.lora_B[ADAPTER].weight.detach()
            if isinstance(weight, DTensor) and isinstance(b, DTensor) and weight.placements == b.placements \
                    and weight.to_local().shape[0] == b.to_local().shape[0]:
                a = _full(layer.lora_A[ADAPTER].weight).float()
                local = weight.to_local()
                rows = (local.float() + (b.to_local().float() @ a) * layer.scaling[ADAPTER]).to(local.dtype)
                weight = DTensor.from_local(rows, weight.device_mesh, weight.placements, shape=weight.shape,
                                            stride=weight.stride())
            else:
                weight = as_placed(merged(_full(weight), layer), weight)
        out[name] = weight
    return out


def adapter_state(model: torch.nn.Module, keep=lambda name: True, dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's saved format (``base_model.model.<module>.lora_A.weight``),
    whole and contiguous (in ``dtype`` if given), for the parameters whose clean name ``keep``
    accepts."""
    out = {}
    for name, param in model.named_parameters():
        name = clean_name(name)
        if is_adapter_param(name) and keep(name):
            tensor = _full(param)
            out[PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")] = tensor.to(dtype or tensor.dtype).contiguous()
    return out


def save_adapter(model: torch.nn.Module, out: str | Path, base_model: str | None = None,
                 keep=lambda name: True, write: bool = True, dtype: torch.dtype | None = None) -> int:
    """Write the adapter as peft does (``adapter_config.json``, ``adapter_model.safetensors``);
    only the modules ``keep`` accepts. Returns the bytes of the tensors written. ``write=False``
    gathers without writing (sharded ranks other than the writer)."""
    from safetensors.torch import save_file

    state = adapter_state(model, keep, dtype)
    if not write:
        return 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.r1v3_lora)
    config.target_modules = sorted({name[len(PEFT_PREFIX):].split(".lora_")[0] for name in state})
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in state.values())
