"""Benchmarks run each setting in a child process of its own, so that peak RSS, allocator state and
thread pools belong to that setting alone. The child is the same script with the parent's own
arguments plus the overrides that pick one setting (argparse keeps the last value given)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_setting(script: str, argv: list[str], overrides: list[str], what: str, python: str = sys.executable,
                env: dict | None = None) -> str:
    """Run ``script`` with ``argv + overrides``; return its last stdout line (its JSON result), or
    exit with the child's error output."""
    out = subprocess.run([python, script, *argv, *overrides], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{Path(script).stem}: {what} failed:\n{out.stderr[-4000:]}")
    return out.stdout.strip().splitlines()[-1]


def internvl_and_shards(work: Path, size: str, n_train: int, vocab: int | None = None) -> tuple[Path, Path]:
    """The InternVL preset of ``size`` (with a tokenizer of ``vocab`` entries if given) and synthetic
    train shards under ``work``: built by the first setting, reused by the next (the model
    directory and the train-shard folder)."""
    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.tools.tiny import build_tiny

    model_dir = Path(work) / (f"internvl-{size}" + (f"-v{vocab}" if vocab else ""))
    if not (model_dir / "config.json").exists():
        build_tiny("internvl", model_dir, size=size, vocab=vocab)
    if not (Path(work) / "data" / "train").exists():
        write_synthetic(Path(work) / "data", n_train=n_train, n_val=8, n_ood=8)
    return model_dir, Path(work) / "data" / "train"


def suppress_eos():
    """A callback that adds EOS to the engine's suppressed ids: every completion is then exactly
    ``max_new_tokens`` long, so settings compared with each other do equal work."""
    from lightning.pytorch import Callback

    class SuppressEOS(Callback):
        def on_fit_start(self, trainer, stage):
            stage.engine.suppress_tokens.append(stage.tokenizer.eos_token_id)
    return SuppressEOS()


def top_ops(prof, n: int = 12) -> list[dict]:
    """The ``n`` ops with the most self CPU time in a finished ``torch.profiler.profile``, each
    with its seconds and share of the profiled total."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "share": round(e.self_cpu_time_total / total, 3)}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]]
