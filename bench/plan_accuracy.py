"""``r1v3 plan``'s host-memory prediction against the measured peak, per rank: SFT and GRPO on 1 and
2 processes (FSDP2 over gloo), on the ``medium`` preset (InternVL, ~0.56B parameters, float32).

    python bench/plan_accuracy.py                      # the four cases, a few minutes each
    python bench/plan_accuracy.py --size tiny --steps 1 --cases sft-1   # smoke run

Each case writes one run config and gives the same file to ``r1v3 plan`` and to ``r1v3 fit`` (run
in a child process, whose ranks Lightning's launcher starts). The data fills the config's bounds,
since the plan is a bound: every SFT sample has one prompt length and one target length, written
into ``max_prompt_length`` and ``max_new_tokens``; GRPO completions never stop early (EOS is
suppressed), one group fills ``micro_batch_tokens`` and each rank has two prompts, so an update
runs two micro-batches and the second one's activations meet the first one's gradients, as in a
real run (with a single micro-batch the gradients are freed before the forward and the peak is
lower than the plan's bound).

Every rank samples its anonymous resident memory (``RssAnon``: shared pages of the memory-mapped
checkpoint excluded) every 2 ms and reports the peak above its baseline, taken after the libraries
are imported and before the model loads; what the planner predicts is the memory the run adds to
that baseline. The children run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (docs/performance.md): with
glibc's adaptive default, freed large blocks stay in the heap and the peak depends on history.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sharded_load import anon_kb

CASES = ("sft-1", "sft-2", "grpo-1", "grpo-2")


class Sampler:
    """The largest ``RssAnon`` seen by a 2-ms sampling thread, and the largest once training started."""

    def __init__(self):
        self.baseline = self.load_peak = anon_kb()
        self.train_peak, self.training, self.where = 0, False, []
        self.main = threading.get_ident()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        import traceback

        while True:
            now = anon_kb()
            if self.training and now > self.train_peak:
                self.train_peak = now
                # Where the main thread is at the new peak: the project's innermost frames.
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                self.where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack
                              if "/r1v3/" in f.filename or "/transformers/" in f.filename][-4:]
            elif not self.training:
                self.load_peak = max(self.load_peak, now)
            time.sleep(0.002)


SAMPLER: Sampler | None = None
try:  # a Lightning callback named in the run config; without Lightning (plain import) it is not needed
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover
    Callback = object


class MarkTraining(Callback):
    """Splits the peak into loading and training, and makes GRPO completions full length."""

    def on_fit_start(self, trainer, stage):
        if hasattr(stage, "engine") and stage.engine is not None:
            stage.engine.suppress_tokens.append(stage.tokenizer.eos_token_id)

    def on_train_start(self, trainer, stage):
        if SAMPLER is not None:
            SAMPLER.training = True


def worker(config: str, out: str) -> None:
    """One rank of ``r1v3 fit --config config``; writes ``rank<r>.json`` into ``out``."""
    import plan_accuracy  # the module the run config's callback comes from (this file runs as __main__)
    import r1v3.stages.grpo  # noqa: F401  the libraries belong to the baseline, not to the run
    import r1v3.stages.sft  # noqa: F401
    from r1v3.cli import main as cli_main

    s = plan_accuracy.SAMPLER = Sampler()
    code = cli_main(["fit", "--config", config])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "returncode": code, "baseline_mb": s.baseline / 1024,
        "load_peak_mb": (s.load_peak - s.baseline) / 1024, "train_peak_mb": (s.train_peak - s.baseline) / 1024,
        "train_peak_at": s.where}))


def write_data(out: Path, n: int, trace_words: int) -> Path:
    """Colour questions with one text, one long trace and one answer: equal lengths everywhere."""
    from r1v3.data_modules.shards import write_shards
    from r1v3.data_modules.synthetic import generate

    trace = " ".join(["I see one shape."] * trace_words)
    samples = [dict(s, id=f"p{i:04d}", trace=trace, answer="A") for i, s in enumerate(generate(n, ("colour",), seed=3))]
    out.mkdir(parents=True, exist_ok=True)
    write_shards(samples, str(out / "train-%06d.tar"), maxcount=10_000)
    return out


def sample_lengths(model_dir: str, data_dir: str) -> tuple[int, int]:
    """(prompt tokens, target tokens) of the data's SFT samples, as the collator builds them."""
    from r1v3.data_modules.webdata import WebDataModule

    data = WebDataModule(train=data_dir, batch_size=2, processor_path=model_dir, max_prompt_length=100_000)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    targets = (batch["labels"] != -100).sum(1)
    lengths = batch["inputs"]["attention_mask"].sum(1)
    assert len(set(targets.tolist())) == 1 and len(set(lengths.tolist())) == 1, "samples differ in length"
    return int(lengths[0] - targets[0]), int(targets[0])


def run_config(case: str, model_dir: str, data_dir: str, steps: int, batch: int, prompt: int, target: int,
               group: int, new_tokens: int, prompts: int) -> dict:
    stage, ranks = case.split("-")
    trainer = {"accelerator": "cpu", "devices": int(ranks), "max_steps": steps, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "limit_val_batches": 0,
               "callbacks": [{"class_path": "plan_accuracy.MarkTraining"}]}
    if int(ranks) > 1:
        trainer["strategy"] = {"class_path": "r1v3.fsdp.FSDP2Strategy"}
    optimizer = {"lr": 1.0e-5, "warmup_ratio": 0.0, "schedule": "constant"}
    common = {"model_path": model_dir, "trainable": ["vision", "connector", "llm"], "optimizer": optimizer}
    if stage == "sft":
        model = {"class_path": "r1v3.stages.sft.SFTStage",
                 "init_args": {**common, "max_new_tokens": target, "val_generate": False}}
        data = {"train": data_dir, "batch_size": batch, "max_prompt_length": prompt}
    else:
        model = {"class_path": "r1v3.stages.grpo.GRPOStage", "init_args": {
            **common, "sampling": {"n": group, "max_new_tokens": new_tokens},
            # One group per micro-batch; 8 tokens of slack for the generation prompt's own template.
            "micro_batch_tokens": prompt + 8 + group * new_tokens, "rollout_log_every": 0,
            "reward_kwargs": {"num_workers": 1}}}
        data = {"train": data_dir, "batch_size": prompts, "max_prompt_length": prompt}
    return {"seed_everything": 0, "trainer": trainer, "model": model,
            "data": {"class_path": "r1v3.data_modules.webdata.WebDataModule", "init_args": data}}


def measure(case: str, config: dict, work: Path) -> dict:
    import yaml

    from r1v3.tools.plan import plan_config

    out = work / case
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    config["trainer"]["default_root_dir"] = str(out)  # where Lightning writes the config it ran
    path.write_text(yaml.safe_dump(config))
    planned = plan_config([str(path)])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"plan_accuracy: {case} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(config["trainer"]["devices"])]
    predicted_mb = planned["host_per_rank_gb"] * 1e9 / 2**20
    peaks = [max(r["load_peak_mb"], r["train_peak_mb"]) for r in ranks]
    measured_mb = max(peaks)
    return {"case": case, "seconds": round(time.perf_counter() - started, 1),
            "predicted_mb": round(predicted_mb), "measured_peak_mb": [round(p) for p in peaks],
            "load_peak_mb": [round(r["load_peak_mb"]) for r in ranks],
            "train_peak_mb": [round(r["train_peak_mb"]) for r in ranks],
            "baseline_mb": [round(r["baseline_mb"]) for r in ranks], "train_peak_at": ranks[0]["train_peak_at"],
            "error": round(predicted_mb / measured_mb - 1, 3),
            "terms_gb": planned["terms_gb"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="r1v3 tiny preset (medium: ~0.56B parameters)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=2, help="SFT samples per rank and step")
    parser.add_argument("--trace-words", type=int, default=60, help="SFT target length, in 4-word sentences")
    parser.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="GRPO completion length")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO prompts per rank and step (a micro-batch each)")
    parser.add_argument("--workdir", help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.out)
        return {}
    from r1v3.tools.tiny import build_tiny

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1v3-plan-accuracy-"))
    model_dir = work / f"internvl-{args.size}"
    if not (model_dir / "config.json").is_file():
        build_tiny("internvl", model_dir, size=args.size)
    data_dir = work / "data"
    if not data_dir.is_dir():
        write_data(data_dir, 64, args.trace_words)
    prompt, target = sample_lengths(str(model_dir), str(data_dir))
    cases = []
    for case in args.cases.split(","):
        config = run_config(case, str(model_dir), str(data_dir), args.steps, args.batch_size, prompt, target,
                            args.group, args.new_tokens, args.prompts)
        cases.append(measure(case, config, work))
    result = {"size": args.size, "prompt_tokens": prompt, "sft_target_tokens": target,
              "sft_batch": args.batch_size, "grpo_group": args.group, "grpo_new_tokens": args.new_tokens,
              "grpo_prompts": args.prompts,
              "malloc_mmap_threshold": 1048576, "cases": cases,
              "worst_error": max((abs(c["error"]) for c in cases), default=0.0)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
