"""The GRPO stage's policy update and its log-prob passes, read by ``GRPOStage.training_step``.

One rollout batch gives ``num_iterations × mini_batches`` optimizer updates, each accumulated over
micro-batches cut by a token budget; the loss of each micro-batch is composed in
:func:`r1v3.rl.objective.micro_batch_loss` (variant, rollout correction, entropy controls, KL).
Kept apart from the stage so that each file reads in one sitting; the class is a mixin of
:class:`r1v3.stages.grpo.GRPOStage` and uses its settings (``hparams``, ``loss_spec``, ``sampling``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

from r1v3.distributed import as_placed, clean_name, is_sharded, reshard
from r1v3.errors import UserError
from r1v3.lora import adapters_disabled
from r1v3.rl import scoring
from r1v3.rl.correction import mismatch_metrics
from r1v3.rl.entropy import masked_mean
from r1v3.rl.entropy_controls import applied_entropy_coef, next_entropy_coef
from r1v3.rl.losses import micro_batch_share
from r1v3.rl.objective import micro_batch_loss
from r1v3.rl.trajectory import StepRollouts


class PolicyUpdate:
    # -- updates ---------------------------------------------------------------------------------
    def update(self, step: StepRollouts, rows: torch.Tensor) -> dict:
        hp, spec = self.hparams, self.loss_spec
        opt, sched = self.optimizers(), self.lr_schedulers()
        spec.correction_mode = self.correction_mode()
        old_logp = None
        t_forward = t_backward = 0.0
        t0 = time.perf_counter()
        if hp.num_iterations * hp.mini_batches > 1:  # off-policy updates need π_old fixed up front
            old_logp = scoring.all_rows(self.model, step, self.sampling.temperature, hp.micro_batch_tokens,
                                        self.device, rows)
        t_old = time.perf_counter() - t0
        first_logp = torch.zeros_like(step.rollouts.logprobs)  # on-policy π_old, for the mismatch metrics
        alpha = applied_entropy_coef(self.entropy_coef, self.last_entropy, spec.entropy.target)
        draws = torch.Generator().manual_seed(hp.rollout_seed + self.global_step)  # Clip-Cov's, reproducible
        stats: dict[str, list] = {}
        first_update, padded = True, 0
        for _ in range(hp.num_iterations):
            chunks = list(rows.chunk(hp.mini_batches)) if len(rows) else []
            if is_sharded(self.model):  # every rank steps the optimizer equally often
                chunks += [rows[:0]] * (hp.mini_batches - len(chunks))
            for mb in chunks:
                opt.zero_grad()
                micros = scoring.synced_micro_batches(step, mb, hp.micro_batch_tokens, self.model, self.device)
                for micro, real in micros:
                    t0 = time.perf_counter()
                    logp, entropy = self.policy_logprobs(step, micro, with_grad=True, entropy_grad=alpha > 0)
                    t_forward += time.perf_counter() - t0
                    router = self.router_aux_loss()
                    if not real:  # zero weight: its backward only joins the other ranks' collectives
                        self.manual_backward(logp.sum() * 0.0 + (router * 0.0 if router is not None else 0.0))
                        padded += 1
                        continue
                    mask = step.loss_mask[micro]
                    old = old_logp[torch.searchsorted(rows, micro)] if old_logp is not None else logp.detach()
                    first_logp[micro] = old
                    loss, st = micro_batch_loss(
                        spec, logp, old, step.rollouts.logprobs[micro], step.advantages[micro], mask, entropy, alpha,
                        step.ref_logprobs[micro] if step.ref_logprobs is not None else None, draws)
                    if router is not None:
                        loss, st["router_aux_loss"] = loss + router, router.detach()
                    share = micro_batch_share(mask, step.loss_mask[mb], hp.loss_agg)
                    t0 = time.perf_counter()
                    self.manual_backward(loss * share)
                    t_backward += time.perf_counter() - t0
                    st["entropy"] = masked_mean(entropy.detach(), mask)
                    if first_update:  # before any step on this batch: engine and trainer must agree
                        st["logprob_gap"] = masked_mean((logp.detach() - step.rollouts.logprobs[micro]).abs(), mask)
                    st["loss"] = loss.detach()
                    for k, v in st.items():
                        stats.setdefault(k, []).append(float(v))
                if not self.gradients_finite():  # a NaN/inf loss or gradient: skip this update
                    opt.zero_grad(set_to_none=True)
                    self.skip_nonfinite("gradient")
                    continue
                self.finite_update()
                if hp.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], hp.max_grad_norm)
                    stats.setdefault("grad_norm", []).append(float(grad_norm))
                opt.step()
                sched.step()
                first_update = False
        stats["lr"] = [opt.param_groups[0]["lr"]]
        reduce = {"max": max, "min": min}
        out = {k: reduce.get(k.rsplit("_", 1)[-1], lambda v: sum(v) / len(v))(v) for k, v in stats.items()}
        out |= self.mismatch(step, rows, old_logp if old_logp is not None else first_logp[rows])
        if "entropy" in out:  # Skywork-OR1's adaptive coefficient follows the measured entropy
            self.last_entropy = out["entropy"]
            if spec.entropy.target is not None:
                self.entropy_coef = next_entropy_coef(self.entropy_coef, out["entropy"], spec.entropy.target,
                                                      spec.entropy.target_step)
        return out | {"old_logprob_s": t_old, "forward_s": t_forward, "backward_s": t_backward,
                      "padded_micro_batches": padded, "entropy_bonus_coef": alpha}

    def mismatch(self, step: StepRollouts, rows: torch.Tensor, old_logp: torch.Tensor) -> dict[str, float]:
        """The engine–trainer mismatch metrics of the rows that entered the update, split by
        prompts with and without images (:func:`r1v3.rl.correction.mismatch_metrics`)."""
        corr = self.loss_spec.correction
        has_image = torch.tensor([bool(step.prompts[g].images) for g in step.group_index[rows].tolist()])
        return mismatch_metrics(old_logp, step.rollouts.logprobs[rows], step.loss_mask[rows].bool(), has_image,
                                corr.tis_cap, corr.mis_bounds, corr.mis_level)

    def correction_mode(self) -> str:
        """The rollout correction to run, with ``auto`` resolved for this engine and precision."""
        engine_dtype = str(getattr(self.engine, "dtype", "float32")).replace("torch.", "")
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        bf16 = "bf16" in precision or next(self.model.parameters()).dtype == torch.bfloat16
        return self.loss_spec.correction.resolve(self.hparams.rollout, engine_dtype, "bfloat16" if bf16 else "float32")

    # -- log-probs of a step's rollouts (r1v3.rl.scoring), at the sampling temperature ------------
    def micro_batches(self, step: StepRollouts, rows: torch.Tensor) -> list[torch.Tensor]:
        return scoring.micro_batches(step, rows, self.hparams.micro_batch_tokens, self.model)

    def policy_logprobs(self, step: StepRollouts, rows: torch.Tensor, with_grad: bool,
                        model: torch.nn.Module | None = None, with_entropy: bool = True, entropy_grad: bool = False):
        """Per-token log-probs [len(rows), T] and entropies of the step's completions (see
        :func:`r1v3.rl.scoring.completion_logprobs`)."""
        with torch.set_grad_enabled(with_grad):
            return scoring.completion_logprobs(model if model is not None else self.model, step, rows,
                                               self.sampling.temperature, self.device, with_entropy, entropy_grad)

    def reference_logprobs(self, step: StepRollouts, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Log-probs of the step's rollouts under ``model`` (default: the reference policy)."""
        model = model if model is not None else self.reference_model()
        with self.lora_reference() if model is self.model else nullcontext():
            return scoring.all_rows(model, step, self.sampling.temperature, self.hparams.micro_batch_tokens,
                                    self.device)

    @contextmanager
    def lora_reference(self):
        """Under LoRA, make the policy the initial policy for the forwards inside: adapters off,
        and the fully trained groups back at their loaded weights (swapped in and out in place)."""
        if not self.lora.enabled:
            yield
            return
        if self.trainable and self.initial_weights is None:
            raise UserError("the LoRA reference needs the loaded weights of the fully trained groups, kept only when "
                            "kl_coef > 0 or a KL monitor is attached when the model is built")
        swap = self.initial_weights or {}
        # Sharded parameters are swapped in their sharded form: units a no-grad forward left
        # gathered (reshard_after_forward: false) are put back first.
        reshard(self.model)
        params = {clean_name(n): p for n, p in self.model.named_parameters()}
        current = {name: params[name].detach().clone() for name in swap}
        with torch.no_grad():
            for name, initial in swap.items():
                params[name].copy_(as_placed(initial, params[name]))
        try:
            with adapters_disabled(self.model):
                yield
        finally:
            reshard(self.model)
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)

    def completion_entropy(self, step: StepRollouts) -> tuple[torch.Tensor, int]:
        """Entropy [N, T] of the current policy's distribution at each completion token (the
        logits that produced it, at the sampling temperature), and the vocabulary size."""
        entropy = scoring.all_rows(self.model, step, self.sampling.temperature, self.hparams.micro_batch_tokens,
                                   self.device, entropy=True)
        return entropy, self.model.get_output_embeddings().weight.shape[0]
