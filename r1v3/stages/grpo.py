"""Stage 2: GRPO with verifiable rewards (Skywork-R1V3, arXiv 2507.06167, §3.2; GRPO from
DeepSeekMath, arXiv 2402.03300).

One training step = one rollout batch, read top-down in ``training_step``:
  rollout (the engine session: wake → sync stale weights → G samples per prompt → sleep) → rewards
  → group advantages → (optional) dynamic sampling → ``num_iterations × mini_batches`` optimizer
  updates, each accumulated over micro-batches cut by a token budget. The step's record
  (:class:`r1v3.rl.trajectory.StepRollouts`) holds it all, and the callbacks read it by field name.

The paper is on-policy (one update per rollout batch), so by default no old log-probs are computed:
the ratio is exactly 1 and the loss is the plain policy gradient. ``global_step``/``max_steps``
count optimizer updates, as everywhere in Lightning.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal, Sequence

import torch
from torchmetrics import MeanMetric

from r1v3 import backbone as bb
from r1v3 import fsdp
from r1v3.distributed import clean_name, max_over_ranks
from r1v3.encoding import PromptEncoder
from r1v3.lora import LoraConfig
from r1v3.rewards import load_reward
from r1v3.rl.advantages import group_advantages, soft_overlong_penalty, zero_variance_groups
from r1v3.rl.correction import RolloutCorrection
from r1v3.rl.engines import EngineSession, build_engine, check_engine_agreement
from r1v3.rl.entropy_controls import EntropyControl
from r1v3.rl.losses import sequence_kl
from r1v3.rl.objective import LossSpec
from r1v3.rl.rollout import Prompt, SamplingConfig, drop_completions_with
from r1v3.rl.trajectory import StepRollouts
from r1v3.rl.vllm_engine import INSTALL_HINT, VLLMConfig, vllm_available
from r1v3.stages.base import OptimizerConfig, R1V3Module
from r1v3.stages.grpo_update import PolicyUpdate
from r1v3.stages.rollout_log import RolloutTable


# Lightning warns that a checkpoint taken every N steps under manual optimization holds the weights
# after the step's update, and suggests keeping copies from before it. For GRPO that is what a
# checkpoint should hold: global_step already counts the update, and a resume starts after it.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

# Like verl's max_num_gen_batches for DAPO: a run whose batches all lack a learning signal stops.
IDLE_BATCH_LIMIT = 20


class GRPOStage(PolicyUpdate, R1V3Module):
    collate_mode = "prompt"

    def __init__(
        self,
        model_path: str,
        trainable: Sequence[str] = ("vision", "connector", "llm"),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, warmup_ratio=0.0, schedule="constant"),
        load: bb.LoadConfig = bb.LoadConfig(),
        lora: LoraConfig = LoraConfig(),
        export_dir: str | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        rollout: Literal["hf", "vllm"] = "hf",
        vllm: VLLMConfig = VLLMConfig(),
        reward_fn: str = "r1v3.rewards.R1V3Reward",
        reward_kwargs: dict | None = None,
        truncation: Literal["score", "zero", "mask"] = "score",
        overlong_buffer: int = 0,
        std_mode: Literal["group", "batch", "none"] = "group",
        loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean",
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        policy_loss: Literal["grpo", "gspo", "gspo-token", "cispo", "sapo"] = "grpo",
        sapo_tau: tuple[float, float] = (1.0, 1.05),
        correction: RolloutCorrection = RolloutCorrection(),
        entropy_control: EntropyControl = EntropyControl(),
        num_iterations: int = 1,
        mini_batches: int = 1,
        micro_batch_tokens: int = 8192,
        logits_chunk: int | None = None,
        max_grad_norm: float = 1.0,
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        kl_in: Literal["loss", "reward"] = "loss",
        reference_cpu_offload: bool = False,
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
                stable; docs/design.md §1).
            load: How the backbone loads: dtype, attention kernel, remote code, module groups for
                unknown families, gradient checkpointing.
            lora: LoRA adapters (peft) on chosen groups, e.g. ``{groups: [llm]}`` with
                ``trainable: [connector]``. The vLLM engine then receives the adapter alone where it
                can (docs/lora.md), and the KL reference is the policy with its adapters disabled.
            export_dir: Save an HF-format checkpoint here when training ends.
            sampling: Rollout sampling: n (= G), temperature, top_p, max_new_tokens, stop.
            rollout: Rollout engine: ``hf`` (generate on the policy) or ``vllm`` (embedded vLLM).
            vllm: Settings of the embedded vLLM engine.
            reward_fn: Import path of the reward callable (items → dicts with ``reward``).
            reward_kwargs: Keyword arguments if ``reward_fn`` is a class.
            truncation: Completions that hit max_new_tokens: ``score`` normally, ``zero`` reward,
                or ``mask`` them out of the loss (DAPO's overlong filtering, arXiv 2503.14476).
            overlong_buffer: DAPO's soft overlong punishment: a reward penalty rising to -1 over
                the last N tokens of max_new_tokens (0 = off; DAPO: a fifth of the budget).
            std_mode: Advantage normalisation: ``group`` std (GRPO), ``batch`` std, ``none``
                (Dr.GRPO, arXiv 2503.20783).
            loss_agg: ``seq-mean-token-mean`` (the paper), ``token-mean`` (DAPO),
                ``seq-mean-token-sum-norm`` (Dr.GRPO).
            clip_eps_low: PPO clip range below 1 (the paper: 0.2).
            clip_eps_high: Clip range above 1; > clip_eps_low is DAPO's clip-higher.
            policy_loss: ``grpo`` (the paper), ``gspo``, ``gspo-token``, ``cispo`` or ``sapo``;
                docs/algorithms.md gives each formula and the clip settings of its paper.
            sapo_tau: SAPO's gate temperatures for positive and negative advantages.
            correction: Importance weights between the engine's sampling log-probs and the
                trainer's (TIS/MIS); ``auto`` turns TIS on where one side computes in bf16.
            entropy_control: High-entropy token selection, entropy bonus (optionally adaptive),
                Clip-Cov/KL-Cov.
            num_iterations: Updates per rollout batch over the same samples (1 = on-policy).
            mini_batches: Optimizer updates each iteration splits the rollout batch into.
            micro_batch_tokens: Token budget of one forward/backward; gradients accumulate.
            logits_chunk: Score this many completion positions at a time from the final hidden
                states, so a micro-batch's [rows, tokens, vocabulary] logits never exist at once.
                0: whole logits. None: 128 for vocabularies of 32k entries or more (real
                checkpoints), else whole logits. Not under FSDP yet (docs/performance.md,
                "Chunked log-probs").
            max_grad_norm: Gradient clipping norm (0 disables).
            kl_coef: β of the KL to the reference policy; 0 (the paper) loads no reference.
            kl_estimator: k1, k2 or k3 (Schulman); docs/design.md §1 gives their gradients.
            kl_in: Apply β·KL in the ``loss`` or subtract it from the ``reward``.
            reference_cpu_offload: Under FSDP2 on GPUs, keep the sharded reference's parameters in
                host memory between its forwards (torch ``CPUOffloadPolicy``).
            dynamic_sampling: Drop groups whose rewards are all equal (DAPO); off by default.
            rollout_log_every: Log a table of sample rollouts every N steps (0 = never).
            val_samples: Validation samples per question at the rollout temperature; their mean
                accuracy is ``val/accuracy`` (the paper's protocol samples at temperature 1.0).
                ``val/accuracy_greedy`` is reported beside it.
            rollout_seed: Base of the per-rank, per-step sampling seeds.
        """
        if logits_chunk is not None and logits_chunk < 0:
            raise bb.BackboneError(f"logits_chunk must be >= 0 (0: whole logits, None: by vocabulary size), "
                        f"got {logits_chunk}")
        if sampling.n < 2:  # one sample per prompt has no group to be better or worse than
            raise bb.BackboneError(f"sampling.n (the group size G) must be at least 2 for GRPO, got {sampling.n}")
        if not 0 <= overlong_buffer <= sampling.max_new_tokens:
            raise bb.BackboneError(f"overlong_buffer must be between 0 and sampling.max_new_tokens "
                                   f"({sampling.max_new_tokens}), got {overlong_buffer}")
        if rollout == "vllm" and not vllm_available():
            raise bb.BackboneError(f"rollout: vllm - {INSTALL_HINT}")
        super().__init__(model_path, trainable, optimizer, load, sampling.max_new_tokens, export_dir, lora)
        self.automatic_optimization = False
        self.logits_chunk = logits_chunk
        self.sampling = sampling
        self.vllm_config = vllm  # hparams keep a plain-dict copy; the engine wants the dataclass
        self.loss_spec = LossSpec(
            policy_loss, clip_eps_low, clip_eps_high, loss_agg, sampling.max_new_tokens, tuple(sapo_tau),
            correction if isinstance(correction, RolloutCorrection) else RolloutCorrection(**correction),
            entropy=entropy_control if isinstance(entropy_control, EntropyControl) else EntropyControl(**entropy_control),
            kl_coef=kl_coef if kl_in == "loss" else 0.0, kl_estimator=kl_estimator)
        self.entropy_coef = self.loss_spec.entropy.bonus_coef  # Skywork-OR1's c, adapted per step
        self.last_entropy: float | None = None
        self.idle_batches = 0  # consecutive rollout batches that dynamic sampling emptied
        self.reseeds = 0  # rollbacks that asked for new rollout seeds
        self.reward_fn = load_reward(reward_fn, reward_kwargs)
        self.engine = None
        self._session: EngineSession | None = None
        self.encoder: PromptEncoder | None = None
        self.reference = None
        self.wants_reference = False  # set by a KL monitor before the model is built
        self.initial_weights: dict[str, torch.Tensor] | None = None  # LoRA: fully trained groups at the start
        self.rollout_table = RolloutTable(every=rollout_log_every)
        self.last_rollouts: StepRollouts | None = None  # this step's record, for the callbacks
        self.placeholder_ids = bb.multimodal_token_ids(self.processor)  # never generated, never fed back
        self.dropped_placeholder_completions = 0
        self.engine_prompt_gap: float | None = None  # the last agreement check's, logged once
        self.val_rollouts: list[StepRollouts] = []  # this validation's sampled records
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("accuracy", "reward", "format_rate", "accuracy_greedy")})

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.encoder = self.prompt_encoder()
        if self.engine is not None:
            self.engine.encoder = self.encoder

    def configure_model(self) -> None:
        super().configure_model()
        needed = self.hparams.kl_coef > 0 or self.wants_reference
        if self.lora.enabled and self.trainable and needed and self.initial_weights is None:
            # The reference is the initial policy: the base without adapters, and the groups that
            # train fully as they were loaded (only these are copied; resume restores after this).
            params = self.backbone.group_parameters()
            self.initial_weights = {clean_name(name): p.detach().clone() for group in self.trainable
                                    for name, p in params[group]}
        if self.hparams.kl_coef > 0:
            self.reference_model()
        # Built before fit (tests, demo), the vLLM engine waits for the trainer's call: started
        # outside a process group, vLLM initialises a default group of its own (world size 1) and a
        # sharded strategy's launch would then find one already there and skip its own.
        if self.engine is None and not (self.hparams.rollout == "vllm" and self._trainer is None):
            if self.encoder is None:  # configure_model without setup (scripts, tests)
                self.encoder = self.prompt_encoder()
            # Sharded or not, every rank builds its own engine here, at the same point (under a
            # process group vLLM's construction is collective: see VLLMEngine), and the session's
            # sync gathers each full tensor on all ranks before pushing it.
            self.engine = build_engine(
                self.hparams.rollout, model_dir=self.model_path, model=self.model, encoder=self.encoder,
                tokenizer=self.tokenizer, vllm_config=self.vllm_config, seed=self.hparams.rollout_seed,
                family=self.backbone.family, group_of=self.backbone.group_of,
                suppress_tokens=self.placeholder_ids, lora=self.lora)

    def reference_model(self, device: str | None = None) -> torch.nn.Module:
        """The frozen initial policy (``model_path``), loaded on first use: for the KL loss, or for a
        KL monitor when the loss has none (on ``device``). Under FSDP2 it is sharded like the policy
        (same mesh and mixed precision, no gradients, no optimizer state, ``reference_cpu_offload``
        on GPUs): its forwards are then collectives, which ``scoring.all_rows`` keeps in step.
        The one place a reference comes from. Under LoRA it is the policy itself, which
        ``reference_logprobs`` runs with its adapters disabled (``lora_reference``): no second copy."""
        if self.lora.enabled:
            return self.model
        if self.reference is None:
            load = self.load_config
            sharded = fsdp.is_fsdp2(self.model)  # FSDP1 keeps a full copy per rank
            ref = bb.load_backbone(self.model_path, dtype=load.dtype,
                                   device=str(self.device) if sharded else device or str(self.device),
                                   trust_remote_code=load.trust_remote_code, groups=load.groups,
                                   on_meta=sharded and fsdp.loads_sharded(self.trainer.strategy))
            model = ref.model.eval().requires_grad_(False)
            model.r1v3_logits_chunk = self.logits_chunk
            self.configure_packing(model)
            if sharded:
                fsdp.shard_reference(model, self, cpu_offload=self.hparams.reference_cpu_offload)
            self.reference = [model]  # a list hides it from Lightning
        return self.reference[0]

    @property
    def session(self) -> EngineSession:
        """The engine's lifecycle (wake → sync → generate → sleep). A new engine (one a script or
        test swapped in) gets a new session, whose first entry pushes every tensor."""
        if self._session is None or self._session.engine is not self.engine:
            self._session = EngineSession(self.engine, lambda: (self.model, self.trainable))
        return self._session

    # -- one GRPO step ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self.count_skips(batch)
        if not self.all_ranks(batch.get("inputs") is not None):  # sharded generation is collective too
            return None
        t0 = time.perf_counter()
        seed = self.hparams.rollout_seed + 100_003 * self.global_step + 7 * self.global_rank + 999_983 * self.reseeds
        [step] = self.rollout(batch, [(self.sampling, seed)])
        t_rollout = time.perf_counter() - t0
        self.score(step)
        t_reward = time.perf_counter() - t0 - t_rollout
        rows = self.advantages(step)
        t1 = time.perf_counter()
        # Sharded: a rank whose rows dynamic sampling dropped still joins the others' updates.
        informative = max_over_ranks(len(rows), self.model, self.device)
        update_stats = self.update(step, rows) if informative else {}
        self.check_progress(informative)
        self.session.mark_stale()  # pushed when the engine next wakes, right before it generates
        timing = {"rollout_s": t_rollout, "reward_s": t_reward, "update_s": time.perf_counter() - t1,
                  "step_s": time.perf_counter() - t0}
        self.log_step(step, timing | update_stats)
        self.last_rollouts = step
        self.rollout_table.maybe_log(self, step.meta, step.rollouts, step.scores)

    def rollout(self, batch: dict, plans: Sequence[tuple[SamplingConfig, int | None]]) -> list[StepRollouts]:
        """The batch's prompts through one engine session, once per (sampling, seed) plan; the
        record of each. The prompts are encoded once, by the collator, for all of them."""
        meta = batch["meta"]
        prompts = [Prompt(t, imgs) for t, imgs in zip(meta["prompt_text"], meta["pil_images"])]
        encoded = batch.get("encoded")
        if encoded is None:  # a batch from another collator: encode once here
            encoded = self.encoder.encode_each(meta["prompt_text"], meta["pil_images"])
        with self.session as engine:
            if self.session.agreement_due():  # the engine sees the trainer's prompt tokens and weights
                self.engine_prompt_gap = check_engine_agreement(
                    engine, self.model, prompts[:2], encoded, meta["id"], self.placeholder_ids,
                    self.encoder.image_kwargs, self.device)
            records = [StepRollouts(prompts, encoded, engine.generate(prompts, sampling, seed=seed, encoded=encoded),
                                    meta, banned_tokens=tuple(self.placeholder_ids)) for sampling, seed in plans]
        for record in records:  # banned on both engines; should one slip through, it never reaches a forward
            self.dropped_placeholder_completions += int(drop_completions_with(
                record.rollouts, self.placeholder_ids, self.tokenizer.pad_token_id).sum())
        return records

    def score(self, step: StepRollouts) -> list[dict]:
        """Rewards of every completion (``step.scores``, ``step.rewards``); a zero for the
        truncated ones under ``truncation: zero``."""
        G, meta = step.group_size, step.meta
        items = [{"question": meta["question"][i // G], "answer": meta["answer"][i // G],
                  "options": meta["options"][i // G], "response": text} for i, text in enumerate(step.texts)]
        step.scores = self.reward_fn(items)
        rewards = torch.tensor([s["reward"] for s in step.scores], dtype=torch.float32)
        if self.hparams.truncation == "zero":
            rewards = torch.where(step.rollouts.truncated, torch.zeros_like(rewards), rewards)
        if self.hparams.overlong_buffer > 0:  # DAPO: long answers lose reward before the hard cut
            rewards = rewards + soft_overlong_penalty(step.rollouts.lengths, self.sampling.max_new_tokens,
                                                      self.hparams.overlong_buffer)
        step.rewards = rewards
        return step.scores

    def advantages(self, step: StepRollouts) -> torch.Tensor:
        """Loss mask, KL (in the reward or for the loss) and group advantages; returns the rows
        that enter the update (all of them, unless dynamic sampling drops flat groups)."""
        hp, rollouts = self.hparams, step.rollouts
        step.loss_mask = rollouts.completion_mask.float()
        if hp.truncation == "mask":
            step.loss_mask = step.loss_mask * (~rollouts.truncated).float()[:, None]
        if hp.kl_coef > 0:
            step.ref_logprobs = self.reference_logprobs(step)
            if hp.kl_in == "reward":
                step.rewards = step.rewards - hp.kl_coef * sequence_kl(rollouts.logprobs, step.ref_logprobs,
                                                                       rollouts.completion_mask, hp.kl_estimator)
        step.advantages = group_advantages(step.rewards, step.group_size, std_mode=hp.std_mode)
        rows = torch.arange(len(step.rewards))
        if hp.dynamic_sampling:
            rows = rows[~zero_variance_groups(step.rewards, step.group_size).repeat_interleave(step.group_size)]
        return rows

    def check_progress(self, informative: int) -> None:
        """Stop a run that dynamic sampling keeps from ever updating: every group of every recent
        batch had equal rewards, so max_steps (counted in updates) would never be reached."""
        self.idle_batches = 0 if informative else self.idle_batches + 1
        if self.idle_batches >= IDLE_BATCH_LIMIT:
            raise bb.BackboneError(
                f"dynamic_sampling dropped every group of the last {IDLE_BATCH_LIMIT} rollout batches (all rewards "
                "equal within each group), so no update happens; check the rewards (train/reward_mean) and the "
                "data's difficulty, or set dynamic_sampling: false")

    def log_step(self, step: StepRollouts, stats: dict) -> None:
        logs = step.summary() | {
            "rollout_tokens_per_s": step.n_tokens / max(stats["rollout_s"], 1e-9),
            "update_tokens_per_s": step.n_tokens * self.hparams.num_iterations / max(stats["update_s"], 1e-9),
            **stats, **{f"sync_{k}": v for k, v in self.session.last_sync.items()}}
        self.session.last_sync = {}
        if self.engine_prompt_gap is not None:  # measured at this step's rollouts
            logs["engine_prompt_logprob_gap"], self.engine_prompt_gap = self.engine_prompt_gap, None
        logs["dropped_placeholder_completions"] = self.dropped_placeholder_completions  # cumulative
        for key, value in (getattr(self.reward_fn, "stats", None) or {}).items():
            logs[f"reward_{key}"] = value  # cumulative: timeouts, errors, judge flips
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, batch_size=len(step.prompts))
        self.log("reward", float(logs["reward_mean"]), prog_bar=True, logger=False)
        self.log("step_s", float(logs["step_s"]), prog_bar=True, logger=False)

    def record(self, prompts: Sequence[Prompt], rollouts) -> StepRollouts:
        """A step record for rollouts made outside ``training_step`` (scripts, benchmarks, tests)."""
        return StepRollouts(list(prompts), self.encoder.encode_each([p.text for p in prompts],
                                                                    [p.images for p in prompts]), rollouts,
                            banned_tokens=tuple(self.placeholder_ids))

    # -- validation: greedy answers through the same engine --------------------------------------
    def validation_step(self, batch: dict, batch_idx: int):
        if batch.get("inputs") is None:
            return
        hp, sampling = self.hparams, self.sampling
        plans = [(SamplingConfig(n=1, temperature=0.0, max_new_tokens=sampling.max_new_tokens, stop=sampling.stop),
                  None)]
        if hp.val_samples > 0:
            seed = hp.rollout_seed + 7 * self.global_rank + 1_000_003 * (batch_idx + 1)  # same per eval
            plans.append((SamplingConfig(n=hp.val_samples, temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_new_tokens=sampling.max_new_tokens, stop=sampling.stop), seed))
        greedy, *sampled = self.rollout(batch, plans)
        names = ("accuracy_greedy",) if sampled else ("accuracy_greedy", "accuracy")
        for s in self.score(greedy):
            for name in names:
                self.val_metrics[name].update(float(s.get("accuracy", 0.0)))
        for step in sampled:
            for s in self.score(step):
                self.val_metrics["accuracy"].update(float(s.get("accuracy", 0.0)))
                self.val_metrics["reward"].update(float(s["reward"]))
                self.val_metrics["format_rate"].update(float(s.get("format", 0.0)))
        self.val_rollouts.extend(sampled or [greedy])  # for the monitoring callbacks

    def on_validation_epoch_start(self) -> None:
        self.val_rollouts = []

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_count:
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "accuracy")
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["r1v3_entropy_control"] = {"coef": self.entropy_coef, "last_entropy": self.last_entropy}
        checkpoint["r1v3_reseeds"] = self.reseeds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.restore_entropy_control(checkpoint)
        self.reseeds = checkpoint.get("r1v3_reseeds", 0)

    def restore_entropy_control(self, checkpoint: dict) -> None:
        state = checkpoint.get("r1v3_entropy_control")
        if state:  # the adaptive coefficient resumes where it was
            self.entropy_coef, self.last_entropy = state["coef"], state["last_entropy"]

    def after_rollback(self, checkpoint: dict, reseed: bool) -> None:
        """The restored weights reach the engine whole before its next rollout, and the engine is
        checked against the trainer again; the entropy controller goes back with the weights."""
        super().after_rollback(checkpoint, reseed)
        self.restore_entropy_control(checkpoint)
        self.idle_batches = 0
        self.reseeds += int(reseed)
        if self.engine is not None:
            self.session.restart()

    def on_train_end(self) -> None:
        if self.engine is not None:
            with self.session:  # the last update reaches the engine too: it ends fit on the final weights
                pass
        super().on_train_end()

    def on_fit_end(self) -> None:
        close = getattr(self.reward_fn, "close", None)
        if close:
            close()

