"""MMMU-style evaluation stage: k samples per question at temperature 1.0, mean accuracy over all of
them (Skywork-R1V3, arXiv 2507.06167, §4; docs/design.md §1), plus pass@k, per-subject accuracy, format
and truncation rates, response length and the "can't see the image" split.

Run with ``r1v3 validate --config configs/eval/mmmu.yaml`` (or ``r1v3 test``). Scoring, metrics and
result files live in :mod:`r1v3.evaluation`; this module only rolls prompts out and wires hooks.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from r1v3 import backbone as bb
from r1v3.rewards.blind_claims import DEFAULT_PHRASES, claim_pattern
from r1v3.encoding import PromptEncoder
from r1v3.evaluation import (NOTHINK_PREFILL, NOWAIT_WORDS, THINKING_MODES, EvalConfigError, EvalMetrics,
                             apply_thinking_mode, banned_token_ids, question_seed, score_rows, write_results)
from r1v3.rl.engines import EngineSession, build_engine
from r1v3.rl.rollout import HFGenerateEngine, Prompt, SamplingConfig
from r1v3.rl.vllm_engine import INSTALL_HINT, VLLMConfig, vllm_available
from r1v3.stages.base import R1V3Module


class EvalStage(R1V3Module):
    collate_mode = "prompt"

    def __init__(
        self,
        model_path: str,
        load: bb.LoadConfig = bb.LoadConfig(),
        rollout: Literal["hf", "vllm"] = "hf",
        vllm: VLLMConfig = VLLMConfig(),
        k: int = 5,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16384,
        thinking: Literal["slow", "nothink", "nowait"] = "slow",
        banned_words: Sequence[str] = NOWAIT_WORDS,
        eval_seed: int = 0,
        hallucination_phrases: Sequence[str] = DEFAULT_PHRASES,
        output_dir: str | None = None,
        verify_workers: int = 2,
        verify_timeout_s: float = 1.0,
        max_batch_rows: int = 256,
    ):
        """Evaluate a model MMMU-style: k samples per question, scored against the reference answer.

        Args:
            model_path: Model to evaluate: an HF directory (e.g. a stage's export_dir) or hub id.
                With the ``hf`` engine, ``--ckpt_path`` may point at a Lightning checkpoint instead.
            load: How the backbone loads (``hf`` engine): dtype, attention kernel, remote code,
                module groups for unknown families.
            rollout: Sampling engine: ``hf`` (``generate`` on the loaded model) or ``vllm`` (embedded
                vLLM on ``model_path``; the HF weights are then not loaded).
            vllm: Settings of the embedded vLLM engine; ``max_model_len`` must hold the prompt plus
                ``max_new_tokens``.
            k: Samples per question; accuracy is their mean (the paper: 5).
            temperature: Sampling temperature (the paper: 1.0; 0 is greedy, k identical samples).
            top_p: Nucleus sampling mass.
            max_new_tokens: Thinking budget per sample; a sample that hits it counts as truncated
                (the paper: up to 16K).
            thinking: ``slow``: the normal think-then-answer prompt. ``nothink``: the assistant turn
                is prefilled with an empty ``<think>\\n\\n</think>\\n\\n`` and the model answers
                directly; the response scored is what follows the prefill, so the format rate is
                expected to be low. ``nowait``: ``slow`` with the tokens of ``banned_words`` banned
                at decoding (NoWait, arXiv 2506.08343).
            banned_words: Words whose tokens ``nowait`` bans: every vocabulary token whose decoded
                text, stripped, is one of them (with or without a leading space).
            eval_seed: Base of the sampling seeds; each batch's seed is a hash of it and the batch's
                question ids, so the same checkpoint, seed, data and batch size give the same results.
            hallucination_phrases: Phrases that claim the image is not visible (matched
                case-insensitively) for ``blind_claim_rate`` and the accuracy split by the flag.
            output_dir: Where rank 0 writes results.json, results.csv and samples.jsonl (default:
                ``<trainer.default_root_dir>/eval``).
            verify_workers: math-verify worker processes for open answers.
            verify_timeout_s: Per-answer math-verify time limit; a timeout scores 0.
            max_batch_rows: Most rows (prompts × k) one ``generate`` call takes (``hf`` engine).
        """
        for name, value, ok, rule in (
                ("k", k, k >= 1, ">= 1"), ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
                ("temperature", temperature, temperature >= 0, ">= 0"), ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
                ("verify_workers", verify_workers, verify_workers >= 1, ">= 1"),
                ("verify_timeout_s", verify_timeout_s, verify_timeout_s > 0, "> 0"),
                ("max_batch_rows", max_batch_rows, max_batch_rows >= 1, ">= 1")):
            if not ok:
                raise EvalConfigError(f"{name} must be {rule}, got {value}")
        if thinking not in THINKING_MODES:
            raise EvalConfigError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
        if rollout == "vllm":
            if not vllm_available():
                raise EvalConfigError(f"rollout: vllm - {INSTALL_HINT}")
            if vllm.max_model_len <= max_new_tokens:
                raise EvalConfigError(f"vllm.max_model_len ({vllm.max_model_len}) must exceed max_new_tokens "
                                      f"({max_new_tokens}): it holds the prompt and the completion")
        super().__init__(model_path=model_path, trainable=(), load=load, max_new_tokens=max_new_tokens)
        self.vllm_config = vllm
        self.sampling = SamplingConfig(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.pattern = claim_pattern(hallucination_phrases)
        self.banned = banned_token_ids(self.tokenizer, banned_words) if thinking == "nowait" else []
        if thinking == "nowait" and not self.banned:
            raise EvalConfigError(f"thinking: nowait, but no token of this tokenizer decodes to {list(banned_words)}")
        self.metrics = EvalMetrics(k)
        self.engine = None
        self.encoder: PromptEncoder | None = None
        self.checker = None
        self._rows: list[dict] = []
        self._started = 0.0

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise EvalConfigError("EvalStage has nothing to train: run `r1v3 validate` or `r1v3 test` with it")
        self.encoder = self.prompt_encoder()
        if isinstance(self.engine, HFGenerateEngine):
            self.engine.encoder = self.encoder
        if self.checker is None:
            from r1v3.rewards import R1V3Reward

            self.checker = R1V3Reward(acc_weight=1.0, format_weight=0.0, num_workers=self.hparams.verify_workers,
                                      timeout_s=self.hparams.verify_timeout_s)

    def configure_model(self) -> None:
        if self.engine is not None:
            return
        suppress = sorted(set(bb.multimodal_token_ids(self.processor)) | set(self.banned))
        hp = self.hparams
        if hp.rollout != "vllm":  # the vLLM engine loads model_path itself: no HF weights here
            super().configure_model()
            self.model.eval()
            if self.encoder is None:  # configure_model called without setup (scripts, tests)
                self.encoder = self.prompt_encoder()
        self.engine = build_engine(hp.rollout, model_dir=self.model_path, model=self.model, encoder=self.encoder,
                                   tokenizer=self.tokenizer, vllm_config=self.vllm_config, seed=hp.eval_seed,
                                   suppress_tokens=suppress, max_batch_rows=hp.max_batch_rows)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before the weights are loaded, which a vLLM-only stage (no HF model) cannot take.
        if self.hparams.rollout == "vllm":
            raise EvalConfigError("rollout: vllm evaluates the HF directory model_path; for a Lightning "
                                  "--ckpt_path use rollout: hf, or export the checkpoint to HF first")
        # A training checkpoint also holds the training data position, which means nothing to an
        # evaluation (and its data module refuses it when the batch size differs). Lightning lets
        # this hook edit the checkpoint before the data module reads it.
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            checkpoint.pop(type(datamodule).__qualname__, None)
        super().on_load_checkpoint(checkpoint)

    def configure_optimizers(self):
        return None

    def training_step(self, batch: dict, batch_idx: int):
        raise EvalConfigError("EvalStage has nothing to train: run `r1v3 validate` or `r1v3 test` with it")

    def teardown(self, stage: str) -> None:
        if self.checker is not None:
            self.checker.close()
            self.checker = None

    # -- evaluation --------------------------------------------------------------------------------
    def prompts(self, meta: dict) -> list[Prompt]:
        return [Prompt(apply_thinking_mode(text, self.hparams.thinking), images)
                for text, images in zip(meta["prompt_text"], meta["pil_images"])]

    def _eval_step(self, batch: dict) -> None:
        self._skipped.update(batch.get("skipped") or {})
        if batch.get("inputs") is None:
            return
        meta = batch["meta"]
        seed = question_seed(self.hparams.eval_seed, meta["id"])
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        prompts = self.prompts(meta)
        # The collator's encoding serves as is unless the thinking mode rewrote the prompt text.
        encoded = batch.get("encoded") if [p.text for p in prompts] == meta["prompt_text"] else None
        session = EngineSession(self.engine, lambda: (self.model, ()), stale=False)  # nothing to push
        with torch.random.fork_rng(devices=cuda), session as engine:
            rollouts = engine.generate(prompts, self.sampling, seed=seed, encoded=encoded)
        k = self.sampling.n
        records = [{"id": meta["id"][i], "subject": meta["subject"][i], "answer": meta["answer"][i],
                    "options": meta["options"][i], "question": meta["question"][i]} for i in range(len(meta["id"]))]
        texts = [rollouts.texts[i * k:(i + 1) * k] for i in range(len(records))]
        rows = score_rows(records, texts, self.checker, self.pattern, lengths=rollouts.lengths.tolist(),
                          truncated=rollouts.truncated.tolist())
        self.metrics.update(rows)
        self._rows.extend(rows)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def _start(self) -> None:
        self._rows, self._skipped, self._started = [], Counter(), time.perf_counter()
        self.metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self._start()

    def on_test_epoch_start(self) -> None:
        self._start()

    def on_validation_epoch_end(self) -> None:
        self._finish("validate")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, split: str) -> None:
        parts = _all_gather((self._rows, dict(self._skipped)))
        rows = _interleave([p[0] for p in parts], self.sampling.n)
        skipped = sum((Counter(p[1]) for p in parts), Counter())
        metrics = self.metrics.compute(sorted({r["subject"] for r in rows}))  # a collective: all ranks
        for name, value in metrics.items():
            if name != "accuracy_by_sample":
                # Already reduced, so every rank holds the same value: averaging it again is exact.
                self.log(f"eval/{name}", value, prog_bar=name == "accuracy", sync_dist=True)
        if self.trainer.is_global_zero:
            out = Path(self.hparams.output_dir or Path(self.trainer.default_root_dir) / "eval")
            paths = write_results(out, metrics, rows, self.settings(split, len(parts)), {
                "questions": sum(r["sample"] == 0 for r in rows), "samples": len(rows),
                "subjects": len({r["subject"] for r in rows}), "skipped": dict(sorted(skipped.items())),
                "verify_timeouts": sum(r["timed_out"] for r in rows),
                "eval_s": round(time.perf_counter() - self._started, 3)})
            rank_zero_info(f"[r1v3] eval accuracy {metrics.get('accuracy', float('nan')):.4f} "
                           f"(k={self.sampling.n}); results in {paths['results.json'].parent}")
        self.metrics.reset()
        self._rows = []

    def settings(self, split: str, world_size: int) -> dict:
        hp = self.hparams
        ckpt = self.trainer.ckpt_path
        out = {"split": split, "model_path": str(self.model_path), "ckpt_path": str(ckpt) if ckpt else None,
               "rollout": hp.rollout, "dtype": self.load_config.dtype, "k": hp.k, "temperature": hp.temperature,
               "top_p": hp.top_p, "max_new_tokens": hp.max_new_tokens, "thinking": hp.thinking,
               "eval_seed": hp.eval_seed, "world_size": world_size,
               "hallucination_phrases": list(hp.hallucination_phrases)}
        if hp.thinking == "nothink":
            out["prefill"] = NOTHINK_PREFILL
        if hp.thinking == "nowait":
            out["banned_words"] = list(hp.banned_words)
            out["banned_token_ids"] = list(self.banned)
        return out


def _all_gather(obj) -> list:
    """``obj`` from every rank, in rank order (a collective when distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _interleave(per_rank: list[list[dict]], k: int) -> list[dict]:
    """Rows back in the data order: the loader deals questions to ranks round-robin."""
    blocks = [[rows[i:i + k] for i in range(0, len(rows), k)] for rows in per_rank]
    out = []
    for i in range(max((len(b) for b in blocks), default=0)):
        for rank_blocks in blocks:
            if i < len(rank_blocks):
                out.extend(rank_blocks[i])
    return out
