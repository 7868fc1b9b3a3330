"""Optimizer in backward: every parameter is updated as soon as its gradient is complete, and that
gradient is freed at once, so a full fine-tune never holds all gradients together (torchtune's
``optimizer_in_bwd``, built on PyTorch's ``Tensor.register_post_accumulate_grad_hook``). With fp32
weights and bitsandbytes AdamW8bit that is 4 + 2 bytes per parameter instead of 4 + 4 + 2
(``bench/memory_8bit.py``).

What it costs: one backward per optimizer step (no gradient accumulation) and no clipping by the
global gradient norm, which needs every gradient at once; both are refused with a clear error. A
parameter whose gradient is non-finite keeps its weights and moments for that step, and the step
is counted as a skipped update.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from that parameter's gradient hook.

    Lightning and the LR scheduler see this object; its ``param_groups`` are the inner optimizers'
    own group dicts, so a scheduler's learning-rate change reaches every parameter.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make: Callable[[list], torch.optim.Optimizer]):
        params = list(params)
        self.inner = [make([p]) for p in params]
        super().__init__(params, defaults={})
        self.param_groups = [opt.param_groups[0] for opt in self.inner]
        self.nonfinite = 0  # parameters skipped since the last optimizer step
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(opt)) for p, opt in zip(params, self.inner)]

    def _hook(self, opt: torch.optim.Optimizer):
        def step_and_free(param: torch.Tensor) -> None:
            if bool(torch.isfinite(param.grad).all()):
                opt.step()
            else:
                self.nonfinite += 1
            param.grad = None
        return step_and_free

    def step(self, closure=None):
        # Lightning's automatic optimization passes the closure that runs training_step and
        # backward: the updates happen inside that backward.
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient is freed as soon as its parameter is updated."""

    def state_dict(self) -> dict:
        return {"in_backward": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        for opt, state in zip(self.inner, state_dict["in_backward"], strict=True):
            opt.load_state_dict(state)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
