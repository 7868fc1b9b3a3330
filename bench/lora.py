"""LoRA against full fine-tuning in GRPO: memory per parameter, step time and weight-sync bytes.

    python bench/lora.py                                   # small and medium, HF rollouts
    ~/.cache/r1v3/venv-vllm/bin/python bench/lora.py --rollout vllm   # the engine's own sync figures
    python bench/lora.py --sizes tiny --steps 2 --warmup 1   # smoke run

Both modes train the same groups of the InternVL preset with the vision tower frozen: ``full``
trains the language model and the connector; ``lora`` puts rank-16 adapters (alpha 32, every linear
layer but the head) on the language model and trains the connector fully; ``lora-merged`` is
``lora`` with ``lora.engine_sync: merged`` (the engine gets merged blocks, not the adapter). Each
(size, mode) runs in a child process of its own with ``MALLOC_MMAP_THRESHOLD_=1048576`` (docs/performance.md), for
``--steps`` rollout batches of ``--prompts`` prompts × G completions of exactly ``--new-tokens``
tokens (EOS suppressed); medians leave out the first ``--warmup`` steps.

Figures per run: parameters (all, trainable), the peak anonymous resident memory (``RssAnon``)
during training above the baseline taken before the model loads, that peak per parameter, the
median step, rollout and update times, and the weight sync: the bytes the engine receives after an
update (the adapter plus the connector under LoRA, every trainable tensor otherwise; measured by the
vLLM engine with ``--rollout vllm``, counted from the same selection with HF rollouts, which push
nothing). The last line gives each mode ÷ full per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from child import internvl_and_shards, run_setting

MODES = ("full", "lora", "lora-merged")


def payload_mb(stage) -> float:
    """What a sync after an update carries, by the engine's own selection
    (``r1v3.rl.weight_sync.push_selection``): tensors, plus the adapter where the engine takes one."""
    from r1v3.lora import adapter_state, model_weights
    from r1v3.rl.engines import engine_adapter_rank
    from r1v3.rl.weight_sync import push_selection

    served = ("llm",) if engine_adapter_rank(stage.lora, stage.model) else ()
    keep, merge, by_adapter = push_selection(stage.model, stage.backbone.group_of, stage.trainable, served)
    size = sum(t.numel() * t.element_size() for _, t in model_weights(stage.model, keep, merge))
    if served:
        size += sum(t.numel() * t.element_size() for t in adapter_state(stage.model, by_adapter).values())
    return size / 2**20


def run_one(args) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer
    from plan_accuracy import Sampler

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.lora import LoraConfig
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    class Collect(Callback):
        def __init__(self):
            self.rows = []

        def on_fit_start(self, trainer, stage):  # fixed-length completions: equal work in both modes
            stage.engine.suppress_tokens.append(stage.tokenizer.eos_token_id)
            sampler.training = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append({k[6:]: float(v) for k, v in m.items() if k.startswith("train/")})

    torch.manual_seed(0)
    model_dir, train = internvl_and_shards(Path(args.workdir), args.size, n_train=args.prompts * (args.steps + 2))
    import peft  # noqa: F401  (imported in both modes before the baseline: its import is not the run's memory)

    sampler = Sampler()
    sync = "merged" if args.mode == "lora-merged" else "auto"
    plan = (dict(trainable=["connector"], lora=LoraConfig(groups=["llm"], r=16, alpha=32, engine_sync=sync))
            if args.mode.startswith("lora") else dict(trainable=["llm", "connector"]))
    stage = GRPOStage(str(model_dir), optimizer=OptimizerConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                      sampling=SamplingConfig(n=args.group_size, max_new_tokens=args.new_tokens),
                      reward_kwargs={"num_workers": 1}, rollout_log_every=0, rollout=args.rollout,
                      vllm=VLLMConfig(max_model_len=1024), **plan)
    collect = Collect()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[collect], log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(train), batch_size=args.prompts))
    rows = collect.rows[args.warmup:]

    def median(key):
        values = [r[key] for r in rows if key in r]
        return round(statistics.median(values), 4) if values else None

    params = [p for n, p in stage.model.named_parameters() if ".lora_" not in n]
    trainable = sum(p.numel() for p in stage.model.parameters() if p.requires_grad)
    peak_mb = (sampler.train_peak - sampler.baseline) / 1024
    out = {"bench": "lora", "size": args.size, "mode": args.mode, "rollout": args.rollout,
           "params": sum(p.numel() for p in params), "trainable_params": trainable,
           "steps_timed": len(rows), "tokens_per_step": args.prompts * args.group_size * args.new_tokens,
           "peak_anon_mb": round(peak_mb, 1),
           "bytes_per_param": round(peak_mb * 2**20 / sum(p.numel() for p in params), 2),
           "step_s_median": median("step_s"), "rollout_s_median": median("rollout_s"),
           "update_s_median": median("update_s"),
           "sync_payload_mb": round(payload_mb(stage), 3)}
    if args.rollout == "vllm":  # the engine's own count after each update (the first push is full)
        out |= {"sync_mb_median": median("sync_mb"), "sync_adapter_mb_median": median("sync_adapter_mb"),
                "sync_s_median": median("sync_s")}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=("tiny", "small", "medium"))
    parser.add_argument("--rollout", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=MODES)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, choices=MODES, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="r1v3-bench-lora-")
    if args.mode is not None:
        print(json.dumps(run_one(args)), flush=True)
        # A finished LoRA child once aborted in interpreter teardown ("terminate called without an
        # active exception"), as tests/fsdp_driver.py's runs did; its result is printed by now.
        sys.stderr.flush()
        os._exit(0)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    results = {}
    for size in args.sizes:
        for mode in args.modes:
            line = run_setting(__file__, raw, ["--size", size, "--mode", mode, "--workdir", args.workdir],
                               f"{size} {mode}", env=env)
            results[size, mode] = json.loads(line)
            print(line, flush=True)
    ratios = {}
    keys = ["peak_anon_mb", "step_s_median", "rollout_s_median", "update_s_median", "sync_payload_mb"]
    keys += ["sync_mb_median", "sync_s_median"] if args.rollout == "vllm" else []
    for size in args.sizes:
        full = results.get((size, "full"))
        for mode in [m for m in args.modes if m != "full" and full]:
            run = results[size, mode]
            ratios[f"{size}/{mode}"] = {k: round(run[k] / full[k], 4) for k in keys
                                        if run.get(k) is not None and full.get(k)}
    print(json.dumps({"bench": "lora", "over_full": ratios}), flush=True)


if __name__ == "__main__":
    main()
