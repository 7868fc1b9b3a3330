"""vLLM on checkpoints with the settings of released ones (the vLLM tier): InternVL tiling with a
151k-token vocabulary and Qwen2.5-VL dynamic resolution (conftest.real_dirs), and directories
saved by other programs (tests/foreign.py)."""

import pytest
from PIL import Image

from test_vllm import collect_engines, greedy, length_reward, train_a_little  # noqa: F401 (fixture, reward)

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("need_vllm")]


def varied_prompts(processor, sizes=((128, 64), (192, 192), (64, 64))):
    """Images whose sizes tile differently (InternVL) or resize to different token counts (Qwen)."""
    from r1v3.chat import render_prompt
    from r1v3.rl.rollout import Prompt

    return [Prompt(render_prompt(processor, "<image>\nHow many red shapes are there?", 1),
                   [Image.new("RGB", size, colour)]) for size, colour in zip(sizes, ("red", "blue", "green"))]


@pytest.fixture(scope="module")
def preset_dirs(tiny_dirs, real_dirs):
    return tiny_dirs | real_dirs


# The current families build with their released image settings (r1v3.tools.tiny): Qwen3-VL dense
# and MoE, InternVL3.5 over Qwen3 and Qwen3-MoE.
@pytest.mark.parametrize("preset", ["internvl_tiled", "qwen2_5_vl_dynamic", "qwen3_vl", "qwen3_vl_moe", "internvl3_5",
                                    "internvl3_5_moe"])
def test_greedy_parity_and_agreement_with_real_image_settings(preset_dirs, preset):
    from r1v3 import backbone as bb
    from r1v3.rl.engines import build_engine, check_engine_agreement
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(preset_dirs[preset]))
    stage.setup("fit")
    stage.configure_model()
    engine = build_engine("vllm", model_dir=str(preset_dirs[preset]), model=None, encoder=stage.encoder,
                          tokenizer=stage.tokenizer, vllm_config=VLLMConfig(max_model_len=1024),
                          family=stage.backbone.family, group_of=stage.backbone.group_of,
                          suppress_tokens=stage.placeholder_ids)
    prompts = varied_prompts(stage.processor)
    encoded = stage.encoder.encode_each([p.text for p in prompts], [p.images for p in prompts])
    assert len({encoded.length(i) for i in range(3)}) == 3, "each image size gives its own token count"

    def agree():
        return check_engine_agreement(engine, stage.model, prompts, encoded, ["a", "b", "c"], stage.placeholder_ids,
                                      stage.encoder.image_kwargs, "cpu")

    assert agree() < 1e-4 and greedy(engine, prompts) == greedy(stage.engine, prompts), "before training"
    train_a_little(stage, prompts[:2], steps=1)
    engine.sync_weights(stage.model, stage.trainable)
    assert agree() < 1e-4 and greedy(engine, prompts) == greedy(stage.engine, prompts), "after a sync"
    assert bb.multimodal_token_ids(stage.processor) == stage.placeholder_ids


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_grpo_on_vllm_from_a_checkpoint_saved_elsewhere(family, tmp_path, synth_dir):
    """Unknown processor class (InternVL), no processor_config.json (Qwen), no video-processor file
    (both): the engine reads the directory through links that add what its processor needs, and
    the agreement check (tokens and log-probs, at start and after the first update's push) passes."""
    from lightning.pytorch import Callback, Trainer

    from foreign import BUILDERS
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.stages.grpo import GRPOStage

    model_dir = BUILDERS[family](tmp_path / family)
    before = sorted(p.name for p in model_dir.iterdir())
    stage = GRPOStage(str(model_dir), rollout="vllm", vllm=VLLMConfig(max_model_len=512),
                      sampling=SamplingConfig(n=2, max_new_tokens=4), reward_fn="test_vllm.length_reward",
                      rollout_log_every=0)
    gaps = []

    class Gaps(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            gaps.append(trainer.callback_metrics.get("train/engine_prompt_logprob_gap"))

    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, callbacks=[Gaps()],
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert trainer.global_step == 2
    assert len(gaps) == 2 and all(g is not None and float(g) < 1e-4 for g in gaps), gaps  # checked twice
    assert float(trainer.callback_metrics["train/logprob_gap"]) < 1e-3
    assert sorted(p.name for p in model_dir.iterdir()) == before, "the checkpoint itself is left as it was"


def test_both_environments_run_the_same_transformers(core_python):
    """One directory must load through the same code in the trainer's venv and the engine's."""
    import subprocess
    from importlib.metadata import requires

    import transformers
    from packaging.requirements import Requirement

    core = subprocess.run([str(core_python), "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, timeout=120).stdout.strip()
    assert core == transformers.__version__, f"core venv {core}, vLLM venv {transformers.__version__}"
    [pinned] = [Requirement(r) for r in requires("r1v3") if Requirement(r).name == "transformers"]
    assert pinned.specifier.contains(core), f"{core} is outside the tested range {pinned.specifier}"


def test_engine_agreement_benchmark_smoke(tmp_path, capsys):
    from conftest import run_bench

    gaps = run_bench("engine_agreement", ["--families", "qwen2_5_vl", "--engine-dtypes", "float32",
                                          "--workdir", str(tmp_path)], capsys)["mean_prompt_logprob_gap"]
    assert gaps["qwen2_5_vl/engine_float32/trainer_fp32"] < 1e-5 < gaps["qwen2_5_vl/engine_float32/trainer_bf16-mixed"]
