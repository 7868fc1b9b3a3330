"""Sharded loading and saving under FSDP2: every rank builds the model with its parameters on the meta device,
shards it, and reads only its own rows of each weight from the memory-mapped safetensors files.

No rank ever holds a full copy: a rank's peak is its shard plus the one tensor slice being
copied (plus a whole tensor where the file stores it transposed: Qwen3-VL-MoE's fused experts).
The names come from transformers' own mapping between its in-memory parameters and a checkpoint
(``revert_weight_conversion``, what ``save_pretrained`` uses). A checkpoint that mapping does not
cover one to one (per-expert files of a fused MoE, renamed towers) loads the usual way, in full, on
every rank, and says so.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FILE_BYTES = 5 * 2**30


@contextmanager
def parameters_on_meta():
    """Create every parameter on the meta device and every buffer for real (rotary frequencies,
    position ids): a model's buffers come from its config, its parameters from the checkpoint."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(path.glob("*.safetensors"))


def checkpoint_keys(model: torch.nn.Module, path: Path) -> dict[str, tuple[str, str]] | None:
    """Parameter name -> (file, checkpoint key), or None when a parameter does not map one to one
    onto a stored tensor."""
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    on_disk = {}
    for file in safetensors_files(path):
        with safe_open(str(file), "pt") as f:
            on_disk.update({key: str(file) for key in f.keys()})
    params = dict(model.named_parameters())
    by_id = {id(p): name for name, p in params.items()}
    reverted = revert_weight_conversion(model, dict(params))
    names = {by_id[id(t)]: key for key, t in reverted.items() if id(t) in by_id}
    if len(names) != len(params) or any(key not in on_disk for key in names.values()):
        return None
    return {name: (on_disk[key], key) for name, key in names.items()}


def build_on_meta(path: str | Path, config, dtype: torch.dtype, attn_implementation: str):
    """The model of ``config`` with its parameters on the meta device, ready to shard, or None when
    its checkpoint cannot be read slice by slice."""
    from transformers import AutoModelForImageTextToText

    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    keys = checkpoint_keys(model, Path(path))
    if keys is None:
        log.warning("[r1v3] %s: its tensors do not map one to one onto the model's parameters; every rank "
                    "loads the whole checkpoint", path)
        return None
    if (Path(path) / "generation_config.json").is_file():  # from_config gives the defaults, not the checkpoint's
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    # transformers picks a from_config model's renamings by its class when saving; once sharded,
    # FSDP2 has swapped that class and the export's names came out mangled
    # (model.language_model.model.layers.*). Pinned here, as from_pretrained pins them.
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    model._weight_conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                                 if not isinstance(c, PrefixChange)]
    model._r1v3_checkpoint_keys = keys
    return model


def materialize(model: torch.nn.Module, device: torch.device | str) -> int:
    """Allocate a sharded meta model's local shards on ``device`` and fill them from the checkpoint
    files, each rank reading only its rows. Returns the largest slice read, in bytes."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from r1v3.distributed import clean_name
    from r1v3.lora import is_adapter_param, unadapted

    keys = model.__dict__.pop("_r1v3_checkpoint_keys")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    largest, files = 0, {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if isinstance(param, DTensor):
                    local = param.to_local()
                    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                          param.placements)
                    start, rows = (offset[0], shape[0]) if param.dim() else (0, 0)
                else:
                    local, start, rows = param.data, 0, param.shape[0] if param.dim() else 0
                if is_adapter_param(name):  # a LoRA tensor, not in the checkpoint: peft's start values
                    local.copy_(adapter_start(clean_name(name), param.shape)[start:start + rows])
                    continue
                file, key = keys[unadapted(clean_name(name))]
                if file not in files:
                    files[file] = safe_open(file, "pt")
                stored = files[file].get_slice(key)
                if list(stored.get_shape()) == list(param.shape):
                    part = stored[start:start + rows] if param.dim() else files[file].get_tensor(key)
                else:  # a whole tensor stored transposed (released Qwen3-VL-MoE experts)
                    part = files[file].get_tensor(key).transpose(1, 2)[start:start + rows]
                largest = max(largest, part.numel() * part.element_size())
                local.copy_(part.to(local.dtype))
    finally:
        files.clear()
    return largest


def adapter_start(name: str, shape: torch.Size) -> torch.Tensor:
    """peft's default start of a LoRA linear (``reset_lora_parameters``): A uniform in ±1/√fan_in
    (Kaiming with a = √5), B zero, so the adapted model starts as the base. Drawn whole from a
    generator seeded by the name, so every rank takes its own rows of one and the same A (ranks
    drawing their rows independently from equal seeds would hold copies of one block)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    seed = (torch.initial_seed() + zlib.crc32(name.encode())) % 2**63
    bound = 1 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))


def save_sharded(model: torch.nn.Module, out: str | Path, params: dict[str, torch.Tensor] | None = None) -> bool:
    """Write a sharded model as an HF safetensors checkpoint without gathering it: every rank saves
    its shards, then rank 0 consolidates them file by file (torch's ``HuggingFaceStorageWriter``),
    under the names transformers' own mapping gives. ``params`` replaces the model's parameters
    (name → sharded tensor: a LoRA model's merged weights). A collective. False (nothing written)
    when the checkpoint layout is not a one-to-one renaming of the parameters."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from transformers.core_model_loading import revert_weight_conversion

    from r1v3.distributed import clean_name

    # named_parameters gives a tied weight once, as save_pretrained stores it
    state = dict(params) if params is not None else {clean_name(n): p.detach() for n, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf not in module._non_persistent_buffers_set:
            state[clean_name(name)] = buffer
    reverted = revert_weight_conversion(model, dict(state))
    if {id(t) for t in reverted.values()} != {id(t) for t in state.values()}:
        return False
    # Files of about 5 GB, as transformers shards its own saves.
    index, used, files = {}, 0, 1
    for key, tensor in reverted.items():
        size = tensor.numel() * tensor.element_size()
        if used and used + size > FILE_BYTES:
            files, used = files + 1, 0
        index[key], used = files, used + size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dcp.save(reverted, storage_writer=HuggingFaceStorageWriter(str(out), fqn_to_index_mapping=index,
                                                               save_distributed=True, enable_consolidation=True))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(out / "sharded", ignore_errors=True)  # the per-rank files, now consolidated
    return True
