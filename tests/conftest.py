"""Session fixtures: tiny models of each family and small synthetic shards, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

FAMILIES = ("internvl", "internvl3_5", "internvl3_5_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from r1v3.tools.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def real_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with the settings of released checkpoints: InternVL tiling up to 4 crops plus a
    thumbnail with a 151k-token vocabulary (Qwen2.5's size), and Qwen2.5-VL dynamic resolution."""
    from r1v3.tools.tiny import build_tiny

    root = tmp_path_factory.mktemp("real")
    return {"internvl_tiled": build_tiny("internvl", root / "internvl_tiled", tiles=4, vocab=151_000),
            "qwen2_5_vl_dynamic": build_tiny("qwen2_5_vl", root / "qwen2_5_vl_dynamic", dynamic=True)}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from r1v3.data_modules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_train=96, n_val=32, n_ood=16, seed=0, maxcount=40)
    return out


@pytest.fixture(scope="session")
def uneven_dir(tmp_path_factory):
    """8 colour questions whose traces alternate between a few target tokens and ~10x more."""
    from r1v3.data_modules.shards import write_shards
    from r1v3.data_modules.synthetic import generate

    long = "I count the shapes one by one and check each colour twice before I answer. " * 4
    samples = [dict(s, id=f"u{i:03d}", trace="One." if i % 2 else long)
               for i, s in enumerate(generate(8, ("colour",), seed=1))]
    out = tmp_path_factory.mktemp("uneven")
    write_shards(samples, str(out / "train-%06d.tar"), maxcount=1000)
    return out


@pytest.fixture(scope="session")
def internvl_processor(tiny_dirs):
    from r1v3.backbone import load_processor

    return load_processor(tiny_dirs["internvl"])


@pytest.fixture(scope="session")
def core_python() -> Path:
    """The core venv's Python, for vLLM-tier tests that chain the two environments; they skip, and
    say why, where it is absent (``.ci/run`` always has both)."""
    import sys

    venv = Path(os.environ.get("R1V3_VENV", Path(__file__).resolve().parents[1] / ".venv"))
    python = venv / "bin" / "python"
    if not python.exists() or venv.resolve() == Path(sys.prefix).resolve():
        pytest.skip(f"the core venv ({venv}, from `bash .ci/setup.sh`) is absent")
    return python


def run_bench(name: str, argv: list[str], capsys) -> dict:
    """Run ``bench/<name>.py``'s ``main`` in this process and return the JSON line it prints. The
    vLLM-tier smoke runs use it: a fresh interpreter would pay vLLM's import again (~15 s)."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main(argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def need_vllm():
    """Skips a vLLM-tier module when vLLM does not import, or fails it under R1V3_REQUIRE_VLLM=1."""
    from r1v3.rl.vllm_engine import vllm_available

    if not vllm_available():
        if os.environ.get("R1V3_REQUIRE_VLLM") == "1":
            pytest.fail("R1V3_REQUIRE_VLLM=1 but vLLM does not import (run `bash .ci/setup_vllm.sh`)")
        pytest.skip("vLLM is not installed (the vLLM tier runs in the venv of .ci/setup_vllm.sh)")


@pytest.fixture(scope="session")
def sft_start(tmp_path_factory) -> tuple[Path, Path]:
    """One short cold-start SFT of the tiny demo model on the colour task, shared by the runs that
    compare GRPO variants: (its HF export, its data). 150 steps leave it weak on purpose (about a
    third of its sampled answers right, and of its responses well formed: reward about 0.35), so
    that a short GRPO run has room to raise it."""
    from lightning.pytorch import Trainer, seed_everything

    from r1v3.data_modules.synthetic import write_synthetic
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.sft import SFTStage
    from r1v3.tools.tiny import build_tiny

    root = tmp_path_factory.mktemp("sft_start")
    build_tiny("internvl", root / "model")
    write_synthetic(root / "data", n_train=512, n_val=32, n_ood=0, seed=0, train_tasks=("colour",))
    seed_everything(0)
    stage = SFTStage(str(root / "model"), optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0), max_new_tokens=24,
                     export_dir=str(root / "sft"))
    Trainer(accelerator="cpu", max_steps=150, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(
        stage, datamodule=WebDataModule(train=str(root / "data" / "train"), batch_size=16))
    return root / "sft", root / "data"
