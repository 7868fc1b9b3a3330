"""Stage 2: GRPO with verifiable rewards (Skywork-R1V3, arXiv 2507.06167, §3.2; GRPO from
DeepSeekMath, arXiv 2402.03300).

One training step = one rollout batch:
  prompts → G samples each (rollout engine) → rewards → group advantages → (optional) dynamic
  sampling → ``num_iterations × mini_batches`` optimizer updates, each accumulated over micro-batches
  cut by a token budget → weight sync to the engine.

The paper is on-policy (one update per rollout batch), so by default no old log-probs are computed:
the ratio is exactly 1 and the loss is the plain policy gradient. ``global_step``/``max_steps``
count optimizer updates, as everywhere in Lightning.
"""

from __future__ import annotations

import time
from typing import Literal, Mapping, Sequence

import torch
from torchmetrics import MeanMetric

from r1v3 import backbone as bb
from r1v3 import fsdp
from r1v3.data_modules.collate import VLMCollator
from r1v3.logprobs import gather_logprobs
from r1v3.rewards import load_reward
from r1v3.rl import prefix
from r1v3.rl.advantages import group_advantages, zero_variance_groups
from r1v3.rl.entropy import entropy_from_logits, masked_mean
from r1v3.rl.losses import aggregate, kl_penalty, micro_batch_share, policy_loss, sequence_kl
from r1v3.rl.rollout import HFGenerateEngine, Prompt, Rollouts, SamplingConfig
from r1v3.rl.vllm_engine import INSTALL_HINT, VLLMConfig, vllm_available
from r1v3.stages.base import OptimizerConfig, R1V3Module
from r1v3.stages.rollout_log import RolloutTable


class GRPOStage(R1V3Module):
    collate_mode = "prompt"

    def __init__(
        self,
        model_path: str,
        trainable: Sequence[str] = ("vision", "connector", "llm"),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, warmup_ratio=0.0, schedule="constant"),
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        groups: Mapping[str, list[str]] | None = None,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        rollout: Literal["hf", "vllm"] = "hf",
        vllm: VLLMConfig = VLLMConfig(),
        reward_fn: str = "r1v3.rewards.R1V3Reward",
        reward_kwargs: dict | None = None,
        truncation: Literal["score", "zero", "mask"] = "score",
        std_mode: Literal["group", "batch", "none"] = "group",
        loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean",
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        num_iterations: int = 1,
        mini_batches: int = 1,
        micro_batch_tokens: int = 8192,
        max_grad_norm: float = 1.0,
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        kl_in: Literal["loss", "reward"] = "loss",
        dynamic_sampling: bool = False,
        rollout_log_every: int = 50,
        val_samples: int = 4,
        rollout_seed: int = 0,
    ):
        """GRPO reinforcement learning from verifiable rewards.

        Args:
            model_path: Policy to start from: an HF directory (e.g. the SFT stage's export_dir).
            trainable: Module groups that train; the paper trains all of them in RL.
            optimizer: Optimizer and schedule (the paper: lr 1e-5, and its own ablation finds 1e-6
                stable; DESIGN §1).
            dtype: Dtype the weights load in.
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (CUDA only).
            trust_remote_code: Allow the checkpoint's own Python code.
            groups: Module groups for families r1v3 does not know.
            gradient_checkpointing: Recompute activations in backward.
            export_dir: Save an HF-format checkpoint here when training ends.
            sampling: Rollout sampling: n (= G), temperature, top_p, max_new_tokens, stop.
            rollout: Rollout engine: ``hf`` (generate on the policy) or ``vllm`` (embedded vLLM).
            vllm: Settings of the embedded vLLM engine.
            reward_fn: Import path of the reward callable (items → dicts with ``reward``).
            reward_kwargs: Keyword arguments if ``reward_fn`` is a class.
            truncation: Completions that hit max_new_tokens: ``score`` normally, ``zero`` reward,
                or ``mask`` them out of the loss (DAPO's overlong filtering, arXiv 2503.14476).
            std_mode: Advantage normalisation: ``group`` std (GRPO), ``batch`` std, ``none``
                (Dr.GRPO, arXiv 2503.20783).
            loss_agg: ``seq-mean-token-mean`` (the paper), ``token-mean`` (DAPO),
                ``seq-mean-token-sum-norm`` (Dr.GRPO).
            clip_eps_low: PPO clip range below 1 (the paper: 0.2).
            clip_eps_high: Clip range above 1; > clip_eps_low is DAPO's clip-higher.
            num_iterations: Updates per rollout batch over the same samples (1 = on-policy).
            mini_batches: Optimizer updates each iteration splits the rollout batch into.
            micro_batch_tokens: Token budget of one forward/backward; gradients accumulate.
            max_grad_norm: Gradient clipping norm (0 disables).
            kl_coef: β of the KL to the reference policy; 0 (the paper) loads no reference.
            kl_estimator: k1, k2 or k3 (Schulman); see README for their gradients.
            kl_in: Apply β·KL in the ``loss`` or subtract it from the ``reward``.
            dynamic_sampling: Drop groups whose rewards are all equal (DAPO); off by default.
            rollout_log_every: Log a table of sample rollouts every N steps (0 = never).
            val_samples: Validation samples per question at the rollout temperature; their mean
                accuracy is ``val/accuracy`` (the paper's protocol samples at temperature 1.0).
                ``val/accuracy_greedy`` is reported beside it.
            rollout_seed: Base of the per-rank, per-step sampling seeds.
        """
        if sampling.n < 2:  # one sample per prompt has no group to be better or worse than
            raise bb.BackboneError(f"sampling.n (the group size G) must be at least 2 for GRPO, got {sampling.n}")
        if rollout == "vllm" and not vllm_available():
            raise bb.BackboneError(f"rollout: vllm - {INSTALL_HINT}")
        super().__init__(model_path, trainable, optimizer, dtype, attn_implementation, trust_remote_code,
                         groups, gradient_checkpointing, sampling.max_new_tokens, export_dir)
        self.automatic_optimization = False
        self.sampling = sampling
        self.vllm_config = vllm  # hparams keep a plain-dict copy; the engine wants the dataclass
        self.reward_fn = load_reward(reward_fn, reward_kwargs)
        self.engine = None
        self.encoder: VLMCollator | None = None
        self.reference = None
        self.rollout_table = RolloutTable(every=rollout_log_every)
        self.last_rollouts: tuple | None = None
        self.val_rollouts: list[tuple] = []  # (prompts, rollouts, scores) of this validation's samples
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("accuracy", "reward", "format_rate", "accuracy_greedy")})

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Encode rollout prompts exactly as the data module does (resolution, system prompt).
        options = getattr(self._trainer.datamodule, "collate_options", {}) if self._trainer else {}
        self.encoder = VLMCollator(self.processor, mode="prompt", **options)
        if self.engine is not None:
            self.engine.encoder = self.encoder

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.kl_coef > 0:
            self.reference_model()
        # Built before fit (tests, demo), the vLLM engine waits for the trainer's call: started
        # outside a process group, vLLM initialises a default group of its own (world size 1) and a
        # sharded strategy's launch would then find one already there and skip its own.
        if self.engine is None and not (self.hparams.rollout == "vllm" and self._trainer is None):
            suppress = bb.multimodal_token_ids(self.processor)
            if self.hparams.rollout == "vllm":
                # Sharded or not, every rank builds its own engine here, at the same point (under
                # a process group its construction is collective: see VLLMEngine), and
                # sync_weights gathers each full tensor on all ranks before pushing it.
                from r1v3.rl.vllm_engine import VLLMEngine, vllm_name_mapper

                self.engine = VLLMEngine(self.model_path, self.vllm_config, seed=self.hparams.rollout_seed,
                                         rename=vllm_name_mapper(self.backbone.family),
                                         group_of=self.backbone.group_of, suppress_tokens=suppress)
            else:
                self.engine = HFGenerateEngine(self.model, self.encoder, self.tokenizer, suppress_tokens=suppress)

    def reference_model(self, device: str | None = None) -> torch.nn.Module:
        """The frozen initial policy (``model_path``), loaded on first use: for the KL loss, or on
        the CPU for a KL monitor when the loss has none. Never sharded: under FSDP each rank holds
        a full copy, and its forwards involve no collectives (so ranks may run different numbers)."""
        if self.reference is None:
            ref = bb.load_backbone(self.model_path, dtype=self.hparams.dtype, device=device or str(self.device),
                                   trust_remote_code=self.hparams.trust_remote_code, groups=self.hparams.groups)
            self.reference = [ref.model.eval().requires_grad_(False)]  # a list hides it from Lightning
        return self.reference[0]

    # -- one GRPO step ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.count_skips(batch)
        if not self.all_ranks(batch.get("inputs") is not None):  # sharded generation is collective too
            return None
        hp, meta, G = self.hparams, batch["meta"], self.sampling.n
        prompts = [Prompt(t, imgs) for t, imgs in zip(meta["prompt_text"], meta["pil_images"])]
        t0 = time.perf_counter()
        seed = hp.rollout_seed + 100_003 * self.global_step + 7 * self.global_rank
        self._engine_call("wake")
        rollouts = self.engine.generate(prompts, self.sampling, seed=seed)
        self._engine_call("sleep")
        t_rollout = time.perf_counter() - t0

        scores = self.score(meta, rollouts)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        truncated = rollouts.truncated
        if hp.truncation == "zero":
            rewards = torch.where(truncated, torch.zeros_like(rewards), rewards)
        t_reward = time.perf_counter() - t0 - t_rollout

        rows = torch.arange(len(rewards))
        loss_mask = rollouts.completion_mask.float()
        if hp.truncation == "mask":
            loss_mask = loss_mask * (~truncated).float()[:, None]
        ref_logp = self.reference_logprobs(prompts, rollouts) if hp.kl_coef > 0 else None
        if ref_logp is not None and hp.kl_in == "reward":
            rewards = rewards - hp.kl_coef * sequence_kl(rollouts.logprobs, ref_logp, rollouts.completion_mask,
                                                         hp.kl_estimator)
        advantages = group_advantages(rewards, G, std_mode=hp.std_mode)
        flat = zero_variance_groups(rewards, G)
        if hp.dynamic_sampling:
            rows = rows[~flat.repeat_interleave(G)]

        t1 = time.perf_counter()
        # Sharded: a rank whose rows dynamic sampling dropped still joins the others' updates.
        any_rows = fsdp.max_over_ranks(len(rows), self.model, self.device)
        update_stats = self.update(prompts, rollouts, advantages, loss_mask, ref_logp, rows) if any_rows else {}
        t_update = time.perf_counter() - t1
        sync = self.engine.sync_weights(self.model, self.trainable)

        n_tokens = float(rollouts.completion_mask.sum())
        acc = torch.tensor([float(s.get("accuracy", 0.0)) for s in scores])
        fmt = torch.tensor([float(s.get("format", 0.0)) for s in scores])
        lengths = rollouts.lengths.float()
        logs = {
            "reward_mean": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else 0.0,
            "accuracy": acc.mean(), "format_rate": fmt.mean(), "truncation_rate": truncated.float().mean(),
            "response_len_mean": lengths.mean(), "response_len_max": lengths.max(),
            "zero_variance_groups": flat.float().mean(), "rollout_s": t_rollout, "reward_s": t_reward,
            "update_s": t_update, "rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
            "update_tokens_per_s": n_tokens * hp.num_iterations / max(t_update, 1e-9),
            "step_s": time.perf_counter() - t0, **update_stats, **{f"sync_{k}": v for k, v in sync.items()},
        }
        for key, value in (getattr(self.reward_fn, "stats", None) or {}).items():
            logs[f"reward_{key}"] = value  # cumulative: timeouts, errors, judge flips
        if ref_logp is not None:
            logs["kl_ref"] = masked_mean(kl_penalty(rollouts.logprobs, ref_logp, "k3"), rollouts.completion_mask)
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, batch_size=len(prompts))
        self.log("reward", float(logs["reward_mean"]), prog_bar=True, logger=False)
        self.log("step_s", float(logs["step_s"]), prog_bar=True, logger=False)
        self.last_rollouts = (meta, rollouts, scores, prompts)  # for callbacks (entropy, KL monitors)
        self.rollout_table.maybe_log(self, meta, rollouts, scores)

    def _engine_call(self, name: str) -> None:
        """Engines that hold their own memory (vLLM on GPU) sleep through updates."""
        method = getattr(self.engine, name, None)
        if method is not None:
            method()

    def on_fit_start(self) -> None:
        # A resumed run's weights differ from the directory the engine was built from.
        if self.hparams.rollout != "hf" and self.trainer.ckpt_path:
            self.engine.sync_weights(self.model, None, force=True)

    def score(self, meta: dict, rollouts: Rollouts) -> list[dict]:
        G = rollouts.group_size
        items = [{"question": meta["question"][i // G], "answer": meta["answer"][i // G],
                  "options": meta["options"][i // G], "response": text}
                 for i, text in enumerate(rollouts.texts)]
        return self.reward_fn(items)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, prompts, rollouts: Rollouts, advantages, loss_mask, ref_logp, rows) -> dict:
        hp = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        old_logp = None
        t_forward = t_backward = 0.0
        t0 = time.perf_counter()
        if hp.num_iterations * hp.mini_batches > 1:  # off-policy updates need π_old fixed up front
            with torch.no_grad():
                parts = [(self.policy_logprobs(prompts, rollouts, micro, with_grad=False,
                                               with_entropy=False)[0], real)
                         for micro, real in self.synced_micro_batches(prompts, rollouts, rows)]
                old_logp = torch.cat([p for p, real in parts if real] or [rollouts.logprobs[:0]])
        t_old = time.perf_counter() - t0
        stats: dict[str, list] = {}
        first_update, padded = True, 0
        for _ in range(hp.num_iterations):
            chunks = list(rows.chunk(hp.mini_batches)) if len(rows) else []
            if fsdp.is_sharded(self.model):  # every rank steps the optimizer equally often
                chunks += [rows[:0]] * (hp.mini_batches - len(chunks))
            for mb in chunks:
                opt.zero_grad()
                for micro, real in self.synced_micro_batches(prompts, rollouts, mb):
                    t0 = time.perf_counter()
                    logp, entropy = self.policy_logprobs(prompts, rollouts, micro, with_grad=True)
                    t_forward += time.perf_counter() - t0
                    if not real:  # zero weight: its backward only joins the other ranks' collectives
                        self.manual_backward(logp.sum() * 0.0)
                        padded += 1
                        continue
                    mask = loss_mask[micro]
                    old = old_logp[torch.searchsorted(rows, micro)] if old_logp is not None else logp.detach()
                    loss, st = policy_loss(logp, old, advantages[micro], mask, hp.clip_eps_low,
                                           hp.clip_eps_high, hp.loss_agg, norm_length=self.sampling.max_new_tokens)
                    if ref_logp is not None and hp.kl_in == "loss":
                        kl = kl_penalty(logp, ref_logp[micro], hp.kl_estimator)
                        loss = loss + hp.kl_coef * aggregate(kl, mask, hp.loss_agg,
                                                             norm_length=self.sampling.max_new_tokens)
                    share = micro_batch_share(mask, loss_mask[mb], hp.loss_agg)
                    t0 = time.perf_counter()
                    self.manual_backward(loss * share)
                    t_backward += time.perf_counter() - t0
                    st["entropy"] = masked_mean(entropy, mask)
                    if first_update:  # before any step on this batch: engine and trainer must agree
                        st["logprob_gap"] = masked_mean((logp.detach() - rollouts.logprobs[micro]).abs(), mask)
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
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        return out | {"old_logprob_s": t_old, "forward_s": t_forward, "backward_s": t_backward,
                      "padded_micro_batches": padded}

    def synced_micro_batches(self, prompts, rollouts: Rollouts, rows: torch.Tensor,
                             model: torch.nn.Module | None = None) -> list[tuple[torch.Tensor, bool]]:
        """``micro_batches`` as (rows, real) pairs. When the model is sharded, each forward/backward
        is a collective, so a rank short of micro-batches pads with passes over one row (real=False)
        until it runs as many as the busiest rank."""
        micros = [(m, True) for m in self.micro_batches(prompts, rollouts, rows)]
        n = fsdp.max_over_ranks(len(micros), model or self.model, self.device)
        return micros + [(torch.tensor([0]), False)] * (n - len(micros))

    def micro_batches(self, prompts, rollouts: Rollouts, rows: torch.Tensor):
        """Cut ``rows`` into runs that fit ``micro_batch_tokens`` (``r1v3.rl.prefix.micro_batches``)."""
        return prefix.micro_batches(self.encoder, prompts, rollouts.completion_mask, rows, rollouts.group_size,
                                    self.hparams.micro_batch_tokens, prefix.shares_prompts(self.model))

    def policy_logprobs(self, prompts, rollouts: Rollouts, rows: torch.Tensor, with_grad: bool,
                        model: torch.nn.Module | None = None, with_entropy: bool = True):
        """Per-token log-probs [len(rows), T] of the sampled completions (temperature-scaled, as
        sampled) and the full-distribution entropy at each completion position (None when
        ``with_entropy`` is off: the old-policy and reference passes never read it, and over a
        real vocabulary it is a full softmax per position)."""
        ids = rollouts.completion_ids[rows].to(self.device)
        with torch.set_grad_enabled(with_grad):
            logits = prefix.rows_completion_logits(
                model if model is not None else self.model, self.encoder, prompts, (rows // rollouts.group_size).tolist(),
                ids, rollouts.completion_mask[rows].to(self.device), self.tokenizer.pad_token_id, self.device)
            temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
            picked = logits.float() / temperature
            logp = gather_logprobs(picked, ids)
            entropy = entropy_from_logits(picked.detach()).cpu() if with_entropy else None
        return logp.cpu() * rollouts.completion_mask[rows], entropy

    @torch.no_grad()
    def reference_logprobs(self, prompts, rollouts: Rollouts, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Log-probs of the rollouts under ``model`` (default: the loaded reference policy)."""
        rows = torch.arange(rollouts.completion_ids.shape[0])
        model = model if model is not None else self.reference[0]
        parts = [self.policy_logprobs(prompts, rollouts, micro, False, model=model, with_entropy=False)[0]
                 for micro in self.micro_batches(prompts, rollouts, rows)]
        return torch.cat(parts)

    @torch.no_grad()
    def completion_entropy(self, prompts, rollouts: Rollouts) -> tuple[torch.Tensor, int]:
        """Entropy [N, T] of the current policy's distribution at each completion token (the
        logits that produced it, at the sampling temperature), and the vocabulary size."""
        rows = torch.arange(rollouts.completion_ids.shape[0])
        parts = [(self.policy_logprobs(prompts, rollouts, micro, False)[1], real)
                 for micro, real in self.synced_micro_batches(prompts, rollouts, rows)]
        parts = [entropy for entropy, real in parts if real]
        return torch.cat(parts), self.model.get_output_embeddings().weight.shape[0]

    # -- validation: greedy answers through the same engine --------------------------------------
    def validation_step(self, batch: dict, batch_idx: int):
        if batch.get("inputs") is None:
            return
        meta = batch["meta"]
        prompts = [Prompt(t, imgs) for t, imgs in zip(meta["prompt_text"], meta["pil_images"])]
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=self.sampling.max_new_tokens,
                                stop=self.sampling.stop)
        names = ("accuracy_greedy",) if self.hparams.val_samples > 0 else ("accuracy_greedy", "accuracy")
        greedy_rollouts = self.engine.generate(prompts, greedy)
        greedy_scores = self.score(meta, greedy_rollouts)
        if self.hparams.val_samples == 0:
            self.val_rollouts.append((prompts, greedy_rollouts, greedy_scores))
        for s in greedy_scores:
            for name in names:
                self.val_metrics[name].update(float(s.get("accuracy", 0.0)))
        if self.hparams.val_samples > 0:
            sampled = SamplingConfig(n=self.hparams.val_samples, temperature=self.sampling.temperature,
                                     top_p=self.sampling.top_p, max_new_tokens=self.sampling.max_new_tokens,
                                     stop=self.sampling.stop)
            seed = self.hparams.rollout_seed + 7 * self.global_rank + 1_000_003 * (batch_idx + 1)  # same per eval
            rollouts = self.engine.generate(prompts, sampled, seed=seed)
            scores = self.score(meta, rollouts)
            self.val_rollouts.append((prompts, rollouts, scores))  # for the monitoring callbacks
            for s in scores:
                self.val_metrics["accuracy"].update(float(s.get("accuracy", 0.0)))
                self.val_metrics["reward"].update(float(s["reward"]))
                self.val_metrics["format_rate"].update(float(s.get("format", 0.0)))

    def on_validation_epoch_start(self) -> None:
        self.val_rollouts = []

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_count:
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "accuracy")
            metric.reset()

    def on_fit_end(self) -> None:
        close = getattr(self.reward_fn, "close", None)
        if close:
            close()

