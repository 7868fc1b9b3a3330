"""Mixture-of-experts language models (Qwen3-VL-MoE, InternVL3.5 over Qwen3-MoE): the router's
load-balancing loss under r1v3's own control, and the expert blocks as sharding units.

transformers computes the load-balancing loss only inside its own loss (SFT with ``labels``) and
only for some wrappers (InternVL over Qwen3-MoE never does), while the GRPO stages compute their loss
from logits. So r1v3 collects the router logits of every training forward with hooks and adds
``coef ×`` transformers' own ``load_balancing_loss_func`` (the Switch Transformer loss, Fedus et al.
2021, eq. 4-6) to each stage's loss, the same way for every family and stage.
"""

from __future__ import annotations

import torch


def moe_text_config(config):
    """The language model's config when it is a mixture of experts, else None."""
    text = getattr(config, "text_config", config)
    return text if getattr(text, "num_experts", 0) and getattr(text, "num_experts_per_tok", 0) else None


def is_router(module: torch.nn.Module) -> bool:
    """A top-k router (``gate``) of a sparse MoE block: a [experts, hidden] weight and a ``top_k``."""
    weight = getattr(module, "weight", None)
    return (hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def is_expert_block(module: torch.nn.Module) -> bool:
    """A sparse MoE block: a router plus the experts it routes to."""
    return hasattr(module, "experts") and is_router(getattr(module, "gate", None) or torch.nn.Module())


class RouterAuxLoss:
    """Collects the router logits of the model's training forwards; :meth:`pop` turns them into
    the weighted load-balancing loss and forgets them.

    Args:
        model: The backbone's model.
        coef: Weight of the loss; ``None`` takes the checkpoint's own setting (its text config's
            ``router_aux_loss_coef`` when ``output_router_logits`` is on, else off), 0 turns it off.
    """

    def __init__(self, model: torch.nn.Module, coef: float | None):
        text = moe_text_config(model.config)
        self.num_experts = getattr(text, "num_experts", 0)
        self.top_k = getattr(text, "num_experts_per_tok", 0)
        if coef is None and text is not None:
            coef = float(text.router_aux_loss_coef) if getattr(text, "output_router_logits", False) else 0.0
        self.coef = float(coef or 0.0) if text is not None else 0.0
        self._logits: list[torch.Tensor] = []
        if text is not None:
            # r1v3 adds the loss itself; transformers adding it too (SFT with labels) would count it twice.
            text.output_router_logits = False
        if self.coef > 0:
            for module in model.modules():
                if is_router(module):
                    module.register_forward_hook(self._collect)

    def _collect(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._logits.append(output[0] if isinstance(output, tuple) else output)

    def pop(self) -> torch.Tensor | None:
        """``coef ×`` the load-balancing loss over every routed token since the last call (None when
        off or when nothing was routed)."""
        logits, self._logits = tuple(self._logits), []
        if self.coef <= 0 or not logits:
            return None
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

        return self.coef * load_balancing_loss_func(logits, self.num_experts, self.top_k)


# Families whose released checkpoints store fused experts as [experts, in, out] (x @ W), the
# transpose of transformers' in-memory [experts, out, in]: transformers transposes on load (when the
# shapes tell which way round) but saves its own layout, which vLLM's loaders then misread.
FUSED_TRANSPOSED = ("qwen3_vl_moe",)
FUSED_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")


def released_expert_tensors(name: str, tensor: torch.Tensor, family: str):
    """One in-memory expert tensor as released checkpoints of ``family`` store it, which is what
    vLLM's loaders read: transposed for Qwen3-VL-MoE, else one tensor per expert and projection
    (Qwen3-MoE under InternVL3.5; gate before up, as transformers fuses them). Other tensors pass."""
    if not name.endswith(FUSED_EXPERTS) or tensor.dim() != 3:
        yield name, tensor
    elif family in FUSED_TRANSPOSED:
        yield name, tensor.transpose(1, 2).contiguous()
    else:
        base, kind = name.rsplit(".", 1)
        for expert, weight in enumerate(tensor):
            if kind == "gate_up_proj":
                gate, up = weight.chunk(2, 0)
                yield f"{base}.{expert}.gate_proj.weight", gate
                yield f"{base}.{expert}.up_proj.weight", up
            else:
                yield f"{base}.{expert}.down_proj.weight", weight


def write_released_layout(out) -> int:
    """After ``save_pretrained``: rewrite a Qwen3-VL-MoE export's fused experts in the released
    layout, so vLLM (and any tool that reads the released checkpoints) loads it. Returns how many
    tensors changed; transformers reads both layouts back."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    if config.get("model_type") not in FUSED_TRANSPOSED:
        return 0
    text = config.get("text_config", config)
    in_memory = {"gate_up_proj": (2 * text["moe_intermediate_size"], text["hidden_size"]),
                 "down_proj": (text["hidden_size"], text["moe_intermediate_size"])}
    changed = 0
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            kind = name.rsplit(".", 1)[-1]
            if name.endswith(FUSED_EXPERTS) and tuple(tensor.shape[1:]) == in_memory[kind]:
                tensors[name] = tensor.transpose(1, 2).contiguous()
                changed += 1
        if changed:
            save_file(tensors, str(path), metadata={"format": "pt"})
    return changed
