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
