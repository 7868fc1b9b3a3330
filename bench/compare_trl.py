"""GRPO step, side by side: r1v3 (HF engine, vLLM engine) vs TRL's GRPOTrainer, equal work.

    ~/.cache/r1v3/venv-bench/bin/python bench/compare_trl.py --families qwen2_5_vl internvl --steps 4
    ~/.cache/r1v3/venv-vllm/bin/python bench/compare_trl.py --sides r1v3-hf r1v3-vllm trl \
        --trl-python ~/.cache/r1v3/venv-bench/bin/python

Each side runs in its own process (peak RSS is per side) on one saved model directory and the same
prompts and images (synthetic shards in r1v3's training order; ``prompts_digest`` shows they match)
and prints a JSON line: median step time after ``--warmup`` steps, generated tokens/s over the whole
step, r1v3 ÷ TRL tokens/s, peak RSS, phases (``other_s``: clipping, optimizer, logging, and TRL's
second image encoding for the loss, which r1v3 counts in ``forward_s``) and ``checks`` read back
from each trainer.

Equal work: G completions per prompt, exactly ``--max-new-tokens`` tokens each (TRL: min_new_tokens;
r1v3: EOS joins the engine's suppressed ids), β=0, one on-policy update per rollout batch (no old
log-prob pass), one micro-batch, group-std advantages, per-sequence token-mean loss (TRL
``loss_type="grpo"`` = r1v3 ``seq-mean-token-mean``), clip 0.2, AdamW lr 1e-5 constant, grad clip 1,
no gradient checkpointing (TRL defaults it on), no dynamic sampling, truncated completions kept,
temperature 1, top-p 1, and one cheap reward that varies within groups (``reward_group_std``).
``--precision bf16``: r1v3 ``bf16-mixed`` autocast and a bf16 vLLM engine, TRL ``bf16=True``
(accelerate's CPU autocast). ``--trl-precision`` sets TRL's apart, for best-against-best runs.

TRL is the benchmark-only extra ``.[bench]``; the package never imports it. trl 1.16.0 installs
beside our torch 2.13 and transformers 5.23 unchanged, but brings accelerate (which changes some
transformers loading paths), datasets, pandas and pyarrow, so it gets a venv of its own layered on
the dev venv (``--system-site-packages`` would expose the base interpreter, not the dev venv;
``site.addsitedir`` also runs the dev venv's .pth files, i.e. r1v3's editable install):

    bash .ci/setup_bench.sh        # ~/.cache/r1v3/venv-bench on top of .venv

The vLLM venv has another torch build (PyPI's CUDA torch on CPU): compare TRL with r1v3-hf from one
venv; ``--trl-python`` only serves a mixed run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child import run_setting

# TRL first: the r1v3 lines carry the ratio to it. ``r1v3-vllm-1thread`` holds torch at the one
# thread vLLM's CPU worker leaves in-process: the vLLM side as it ran before r1v3 gave the trainer
# its threads back (r1v3/rl/vllm_engine.py), for the before/after of that fix.
SIDES = ("trl", "r1v3-hf", "r1v3-vllm", "r1v3-vllm-1thread")
PHASES = ("rollout_s", "reward_s", "old_logprob_s", "forward_s", "backward_s", "sync_s")


def text_score(text: str) -> float:
    """Share of distinct characters: deterministic, microseconds, and different across the samples
    of a group (so GRPO's group advantages are non-zero and every row gets a gradient)."""
    return len(set(text)) / (len(text) + 1)


LAST_REWARDS: list[float] = []  # the latest call's scores, G consecutive per prompt on both sides


def r1v3_reward(items):  # r1v3's reward interface: items with "response" -> dicts with "reward"
    LAST_REWARDS[:] = [text_score(item["response"]) for item in items]
    return [{"reward": r} for r in LAST_REWARDS]


def trl_reward(completions, **kwargs):  # TRL's: conversational completions -> floats
    LAST_REWARDS[:] = [text_score(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
    return list(LAST_REWARDS)


def group_std(G: int) -> float:
    """Mean within-group reward std: > 0 means non-zero advantages, hence real gradients."""
    groups = [LAST_REWARDS[i:i + G] for i in range(0, len(LAST_REWARDS), G)]
    return statistics.mean(statistics.pstdev(g) for g in groups)


def prepare(args, family: str) -> tuple[Path, Path]:
    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir)
    model_dir, data_dir = work / f"{family}-{args.size}", work / "data"
    if not (model_dir / "config.json").exists():
        build_tiny(family, model_dir, size=args.size)
    if not (data_dir / "train").exists():
        write_synthetic(data_dir, n_train=args.prompts * (args.steps + 2), n_val=8, n_ood=8)
    return model_dir, data_dir


def data_module(args, data_dir: Path, processor_path: str | None = None):
    from r1v3.data_modules.webdata import WebDataModule

    return WebDataModule(str(data_dir / "train"), batch_size=args.prompts, max_prompt_length=4096,
                         processor_path=processor_path)


def prompt_order(args, model_dir: Path, data_dir: Path) -> list[dict]:
    """The samples r1v3's training loop sees, in its order (seed 0, epoch 0, one rank): TRL reads
    them unshuffled, so both sides roll out the same prompts and images at every step."""
    dm = data_module(args, data_dir, str(model_dir))
    dm.setup("fit")
    dm.collate_mode = "prompt"
    rows = []
    for batch in dm.train_dataloader():
        m = batch["meta"]
        rows += [{"question": q, "options": o, "images": i}
                 for q, o, i in zip(m["question"], m["options"], m["pil_images"])]
        if len(rows) >= args.prompts * args.steps:
            return rows
    return rows


def summary(args, side: str, rows: list[dict], questions: list[str], checks: dict) -> dict:
    timed = rows[args.warmup:]
    med = {k: round(statistics.median(r[k] for r in timed), 4) for k in timed[0]}
    return {"bench": "compare_trl", "side": side, "family": args.family, "size": args.size,
            "precision": args.precision, "prompts": args.prompts, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "steps_timed": len(timed),
            "step_s_median": med.pop("step_s"), "tokens_per_step": med.pop("tokens"),
            "reward_group_std": med.pop("reward_group_std"),
            "tokens_per_s": round(statistics.median(r["tokens"] / r["step_s"] for r in timed), 1),
            "phases_median": med, "prompts_digest": hashlib.sha1("\n".join(questions).encode()).hexdigest()[:12],
            "checks": checks,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_r1v3(args, model_dir: Path, data_dir: Path, engine: str, one_thread: bool = False) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer

    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    class Timer(Callback):
        def __init__(self):
            self.rows, self.questions, self.t0 = [], [], 0.0

        def on_fit_start(self, trainer, stage):
            # Equal work: EOS joins the engine's suppressed ids (HF: SuppressTokensLogitsProcessor,
            # vLLM: logit_bias -100), the counterpart of TRL's min_new_tokens = max_new_tokens.
            stage.engine.suppress_tokens.append(stage.tokenizer.eos_token_id)
            if one_thread:
                torch.set_num_threads(1)

        def on_train_batch_start(self, trainer, stage, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
            step_s = time.perf_counter() - self.t0
            m = trainer.callback_metrics
            row = {k: float(m[f"train/{k}"]) for k in PHASES if f"train/{k}" in m}
            row["other_s"] = step_s - sum(row.values())
            row["step_s"], row["tokens"] = step_s, float(stage.last_rollouts.rollouts.completion_mask.sum())
            row["reward_group_std"] = group_std(args.group_size)
            self.rows.append(row)
            self.questions += batch["meta"]["question"]

    torch.manual_seed(0)
    vllm_dtype = "bfloat16" if args.precision == "bf16" else "auto"
    stage = GRPOStage(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                      sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.max_new_tokens),
                      rollout=engine, vllm=VLLMConfig(max_model_len=1024, dtype=vllm_dtype),
                      reward_fn="__main__.r1v3_reward",
                      dynamic_sampling=False, kl_coef=0.0, rollout_log_every=0)
    timer = Timer()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                      precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[timer], log_every_n_steps=1)
    trainer.fit(stage, datamodule=data_module(args, data_dir))
    checks = {"precision": str(trainer.precision), "dtype": str(stage.model.dtype), "threads": torch.get_num_threads(),
              "gradient_checkpointing": stage.model.is_gradient_checkpointing}
    if engine == "vllm":
        checks["vllm_dtype"] = str(stage.engine.llm.llm_engine.model_config.dtype)
    return summary(args, f"r1v3-{engine}" + ("-1thread" if one_thread else ""), timer.rows, timer.questions, checks)


def run_trl(args, model_dir: Path, data_dir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1v3.backbone import load_processor
    from r1v3.chat import build_messages

    G, P, T = args.group_size, args.prompts, args.max_new_tokens

    phase: dict = {}

    def timed(key, fn):
        def wrapper(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                phase[key] = phase.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    class TimedGRPO(GRPOTrainer):
        """TRL's trainer with wall-clock timers around its own methods; behaviour unchanged. (Its
        profiling_context timings are sent only to wandb/mlflow/trackio, so they cannot be read.)"""

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            phase["tokens"] = float(out["completion_mask"].sum())
            phase["questions"] = [x["question"] for x in inputs[::G]]
            phase["old_logprob_pass"] = "old_per_token_logps" in out  # TRL skips it when on-policy
            return out

    # trl 1.16 grpo_trainer.py: _generate = chat template, image processing, generate, decode;
    # _prepare_inputs = that + rewards + advantages (+ old log-probs, not needed here);
    # compute_loss = policy forward + loss; transformers' Trainer.training_step = those + backward.
    for name, key in (("_generate", "rollout_s"), ("_calculate_rewards", "reward_s"),
                      ("_prepare_inputs", "prepare_s"), ("compute_loss", "forward_s"),
                      ("training_step", "train_step_s")):
        setattr(TimedGRPO, name, timed(key, getattr(GRPOTrainer, name)))

    class Timer(TrainerCallback):
        def __init__(self):
            self.rows, self.questions, self.t0 = [], [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            phase.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # after clipping and optimizer.step()
            step_s = time.perf_counter() - self.t0
            row = {"rollout_s": phase["rollout_s"], "reward_s": phase["reward_s"], "forward_s": phase["forward_s"],
                   "backward_s": phase["train_step_s"] - phase["prepare_s"] - phase["forward_s"]}
            row["other_s"] = step_s - sum(row.values())
            row["step_s"], row["tokens"], row["reward_group_std"] = step_s, phase["tokens"], group_std(G)
            self.rows.append(row)
            self.questions += phase["questions"]

    samples = prompt_order(args, model_dir, data_dir)
    # TRL's VLM format: conversational prompts whose {"type": "image"} parts its
    # prepare_multimodal_messages fills from the "images" column (trl/data_utils.py).
    dataset = Dataset.from_list([{"prompt": build_messages(s["question"], len(s["images"]), options=s["options"]),
                                  "images": s["images"], "question": s["question"]} for s in samples])
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl-out"), use_cpu=True, seed=0, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=args.steps,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=G, shuffle_dataset=False, remove_unused_columns=False,
        max_completion_length=T, generation_kwargs={"min_new_tokens": T},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=1.0, gradient_checkpointing=False, bf16=args.precision == "bf16",
        fp16=False,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    torch.manual_seed(0)
    # The processor comes from r1v3's loader only because AutoProcessor insists on a video
    # processor that needs torchvision (absent here, docs/design.md §2); the model is loaded by TRL.
    trainer = TimedGRPO(model=str(model_dir), reward_funcs=trl_reward, args=config, train_dataset=dataset,
                        processing_class=load_processor(model_dir))
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    checks = {"precision": trainer.accelerator.mixed_precision, "dtype": str(trainer.model.dtype),
              "gradient_checkpointing": trainer.model.is_gradient_checkpointing, "trl": trl.__version__,
              "old_logprob_pass": phase["old_logprob_pass"]}
    return summary(args, "trl", timer.rows, timer.questions, checks)


def unavailable(side: str, python: str) -> str | None:
    """Why ``side`` cannot run under ``python`` (None if it can)."""
    module = {"trl": "trl", "r1v3-vllm": "vllm", "r1v3-vllm-1thread": "vllm"}.get(side)
    failed = module and subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode
    return f"`import {module}` fails in {python}" if failed else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["qwen2_5_vl", "internvl"],
                        choices=("internvl", "qwen2_5_vl", "llava"))
    parser.add_argument("--sides", nargs="+", default=None, choices=SIDES,
                        help="default: all; a side whose package does not import prints a skipped line")
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    for flag, default in (("--steps", 4), ("--warmup", 1), ("--prompts", 4), ("--group-size", 8),
                          ("--max-new-tokens", 64)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--trl-precision", default=None, choices=("fp32", "bf16"),
                        help="TRL's precision when it differs from r1v3's (default: --precision)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter for the TRL side")
    parser.add_argument("--run-side", default=None, choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--family", default=None, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-trl-")
    if args.run_side:  # child: one side, one family
        model_dir, data_dir = prepare(args, args.family)
        if args.run_side == "trl" and args.trl_precision:
            args.precision = args.trl_precision
        result = (run_trl(args, model_dir, data_dir) if args.run_side == "trl"
                  else run_r1v3(args, model_dir, data_dir, args.run_side.split("-")[1], args.run_side.endswith("1thread")))
        print(json.dumps(result), flush=True)
        return
    sides = sorted(set(args.sides or SIDES), key=SIDES.index)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for family in args.families:
        prepare(args, family)  # once, before the sides: they all read the same directories
        trl_tps = None
        for side in sides:
            python = args.trl_python if side == "trl" else sys.executable
            reason = unavailable(side, python)
            if reason:
                print(json.dumps({"bench": "compare_trl", "side": side, "family": family, "skipped": reason}),
                      flush=True)
                continue
            result = json.loads(run_setting(__file__, raw, ["--run-side", side, "--family", family, "--workdir",
                                                            args.workdir], f"{side} on {family}", python, env))
            if side == "trl":
                trl_tps = result["tokens_per_s"]
            result["tokens_per_s_over_trl"] = round(result["tokens_per_s"] / trl_tps, 2) if trl_tps else None
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
