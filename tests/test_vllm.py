"""The embedded vLLM engine, for real, on tiny models of each family (the vLLM tier).

Runs in the environment `.ci/setup_vllm.sh` builds. Without vLLM these tests skip, unless
R1V3_REQUIRE_VLLM=1 (set by .ci/run), which turns a missing or broken vLLM into a failure.
"""


import pytest
import torch


pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("need_vllm")]


@pytest.fixture(autouse=True)
def collect_engines():
    """A vLLM engine that is garbage-collected tears down vLLM's process-wide parallel groups. Its
    test's engines are collected here, between tests, and never in the middle of the next test."""
    import gc

    yield
    gc.collect()

FAMILIES = ("internvl", "qwen2_5_vl", "llava")


def prompts_for(processor, n=2):
    from PIL import Image

    from r1v3.chat import render_prompt
    from r1v3.rl.rollout import Prompt

    colours = ["red", "blue", "green", "orange"]
    return [Prompt(render_prompt(processor, "<image>\nHow many red shapes are there?", 1),
                   [Image.new("RGB", (64, 64), colours[i % 4])]) for i in range(n)]


def build_pair(family, tmp_path, trainable=None, generation=None, tied=False):
    """A tiny model dir, a GRPO stage on it (HF engine) and a vLLM engine from the same dir.
    ``generation`` adds settings to the dir's generation_config.json, as released checkpoints have."""
    import json

    from r1v3 import backbone as bb
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine, vllm_name_mapper
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    model_dir = build_tiny(family, tmp_path / family, tied=tied)
    if generation:
        config_file = model_dir / "generation_config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | generation))
    kwargs = {"trainable": trainable} if trainable else {}
    stage = GRPOStage(str(model_dir), **kwargs)
    stage.setup("fit")
    stage.configure_model()
    engine = VLLMEngine(str(model_dir), VLLMConfig(max_model_len=512), seed=0,
                        rename=vllm_name_mapper(stage.backbone.family), group_of=stage.backbone.group_of,
                        suppress_tokens=bb.multimodal_token_ids(stage.processor))
    return stage, engine


def train_a_little(stage, prompts, lr=1e-2, steps=3):
    """Real optimizer steps (AdamW on the LM loss of the prompts) on the trainable groups."""
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    tokens, images = stage.encoder.encode_prompts([p.text for p in prompts], [p.images for p in prompts])
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
    for _ in range(steps):
        opt.zero_grad()
        stage.model(**tokens, **images, labels=labels).loss.backward()
        opt.step()


def greedy(engine, prompts, n_tokens=12):
    from r1v3.rl.rollout import SamplingConfig

    out = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=n_tokens))
    return [row[: int(m.sum())].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_after_sync(family, tmp_path):
    stage, engine = build_pair(family, tmp_path)
    prompts = prompts_for(stage.processor)
    assert greedy(engine, prompts) == greedy(stage.engine, prompts), "parity before training"
    train_a_little(stage, prompts)
    stats = engine.sync_weights(stage.model, stage.trainable)
    assert stats["tensors"] == sum(1 for p in stage.model.parameters() if p.requires_grad)
    assert greedy(engine, prompts) == greedy(stage.engine, prompts), "parity after sync"


def test_checkpoint_generation_settings_do_not_reach_vllm(tmp_path):
    # vLLM reads generation_config.json as its sampling defaults unless told not to; the trainer
    # scores the plain softmax, so greedy rollouts must equal the HF engine's (which the core tier
    # checks against the trainer's argmax) despite the checkpoint's repetition_penalty.
    stage, engine = build_pair("qwen2_5_vl", tmp_path, generation={"repetition_penalty": 1.3})
    prompts = prompts_for(stage.processor)
    assert greedy(engine, prompts, n_tokens=24) == greedy(stage.engine, prompts, n_tokens=24)


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_connector_only_push_keeps_parity(family, tmp_path):
    stage, engine = build_pair(family, tmp_path, trainable=["connector"])
    prompts = prompts_for(stage.processor)
    train_a_little(stage, prompts, lr=0.1)
    stats = engine.sync_weights(stage.model, stage.trainable)
    assert stats["tensors"] == sum(1 for _ in stage.backbone.module("connector").parameters())
    assert greedy(engine, prompts) == greedy(stage.engine, prompts)


def test_logprob_gap_small_after_sync_at_any_temperature_and_large_after_a_corrupt_push(tmp_path):
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.scoring import completion_logprobs

    stage, engine = build_pair("internvl", tmp_path)
    prompts = prompts_for(stage.processor, 3)
    train_a_little(stage, prompts)
    engine.sync_weights(stage.model, stage.trainable)
    rows = torch.arange(6)
    # At any temperature: vLLM reports the tempered distribution it samples, as the trainer scores it
    # (vLLM's default, raw log-probs, put the gap at T=0.7 far above the bound).
    for temperature in (1.0, 0.7):
        rollouts = engine.generate(prompts, SamplingConfig(n=2, temperature=temperature, max_new_tokens=10), seed=3)
        with torch.no_grad():
            trainer_logp, _ = completion_logprobs(stage.model, stage.record(prompts, rollouts), rows, temperature,
                                                  "cpu", with_entropy=False)
        mask = rollouts.completion_mask.bool()
        gap = (trainer_logp - rollouts.logprobs)[mask].abs().mean()
        assert gap < 1e-3, f"engine and trainer disagree after a sync at T={temperature}: {gap}"

    # A push that does not match the trainer (here: noise on the LM head) is what a broken sync
    # looks like; the gap monitor must see it.
    torch.manual_seed(0)
    head = stage.model.lm_head.weight.detach()
    corrupt = [("lm_head.weight", head + 0.5 * torch.randn_like(head))]
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": corrupt})
    engine.llm.reset_prefix_cache()
    engine.llm.llm_engine.reset_encoder_cache()
    stale = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=10), seed=3)
    trainer_logp, _ = stage.policy_logprobs(stage.record(prompts, stale), rows, with_grad=False)
    mask = stale.completion_mask.bool()
    assert (trainer_logp - stale.logprobs)[mask].abs().mean() > 0.05, "a corrupt push must show as a gap"


def length_reward(items):
    return [{"reward": min(len(it["response"]) / 40.0, 1.0)} for it in items]


def test_grpo_with_vllm_engine_pushes_only_the_connector(tiny_dirs, synth_dir):
    from lightning.pytorch import Trainer

    from r1v3.backbone import multimodal_token_ids
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import HFGenerateEngine, SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.base import OptimizerConfig
    from r1v3.stages.grpo import GRPOStage

    stage = GRPOStage(str(tiny_dirs["qwen2_5_vl"]), trainable=["connector"], rollout="vllm",
                      vllm=VLLMConfig(max_model_len=512), sampling=SamplingConfig(n=4, max_new_tokens=12),
                      reward_fn="test_vllm.length_reward", rollout_log_every=0,
                      optimizer=OptimizerConfig(lr=3e-2, warmup_ratio=0.0, schedule="constant"))
    stage.setup("fit")
    stage.configure_model()
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert isinstance(stage.engine, VLLMEngine)
    changed = {n for n, p in stage.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    connector = {n for n, _ in stage.backbone.module("connector").named_parameters()}
    assert changed and all(n.startswith("model.visual.merger.") for n in changed)
    assert float(trainer.callback_metrics["train/sync_tensors"]) == len(connector)
    assert float(trainer.callback_metrics["train/logprob_gap"]) < 1e-3  # the first step's engine was in sync
    hf = HFGenerateEngine(stage.model, stage.encoder, stage.tokenizer,
                          suppress_tokens=multimodal_token_ids(stage.processor))
    prompts = prompts_for(stage.processor)
    assert greedy(stage.engine, prompts) == greedy(hf, prompts)


def test_seeded_sampling_is_reproducible_across_chunked_prefill(tmp_path):
    """Enough prompts that vLLM chunks the prefill (more than 4,096 prompt tokens in one call)."""
    from r1v3.rl.rollout import SamplingConfig

    stage, engine = build_pair("internvl", tmp_path)
    prompts = prompts_for(stage.processor, 128)
    sampling = SamplingConfig(n=2, max_new_tokens=6)
    first = engine.generate(prompts, sampling, seed=11)
    again = engine.generate(prompts, sampling, seed=11)
    other = engine.generate(prompts, sampling, seed=12)
    assert len(first.texts) == 256
    assert first.texts == again.texts
    assert first.texts != other.texts


def test_eval_stage_with_vllm_engine(tiny_dirs, synth_dir, tmp_path):
    """EvalStage samples through vLLM without loading the HF weights; nowait's bans reach the engine."""
    import json

    from lightning.pytorch import Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.evaluate import EvalStage

    stage = EvalStage(str(tiny_dirs["internvl"]), rollout="vllm", vllm=VLLMConfig(max_model_len=512), k=2,
                      max_new_tokens=8, thinking="nowait", output_dir=str(tmp_path), verify_workers=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=2)
    trainer.validate(stage, datamodule=WebDataModule(val=str(synth_dir / "val"), val_batch_size=4), verbose=False)
    assert isinstance(stage.engine, VLLMEngine) and stage.model is None
    assert stage.banned and set(stage.banned) <= set(stage.engine.suppress_tokens)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["counts"]["samples"] == 16 and result["settings"]["rollout"] == "vllm"


def test_the_trainer_keeps_its_threads_after_the_engine_starts(tmp_path):
    """vLLM's CPU worker sets torch to one thread and makes torch.set_num_threads a no-op; in-process
    that would slow the trainer's own update, so the engine gives both back."""
    configured = torch.get_num_threads()
    torch.set_num_threads(2)  # the trainer's setting; vLLM would leave it at 1
    before = torch.get_num_threads()
    stage, engine = build_pair("internvl", tmp_path)
    assert torch.get_num_threads() == before == 2
    torch.set_num_threads(1)  # the real function again: it takes effect
    assert torch.get_num_threads() == 1
    torch.set_num_threads(configured)
    assert torch.get_num_threads() == configured
    prompts = prompts_for(stage.processor)
    assert greedy(engine, prompts) == greedy(stage.engine, prompts), "the engine still generates as before"


def test_a_placeholder_with_the_highest_logit_is_never_emitted(tmp_path):
    """The ban on image placeholders is hard on both engines. vLLM clamps logit_bias to ±100, so a
    bias of -100 let a placeholder through once its logit led by more (the engines now whitelist
    every other token). The model is edited so that a placeholder wins every argmax: the last layer's
    value bias adds one large constant direction to every hidden state, and the placeholder's output
    row points along it."""
    from r1v3.backbone import multimodal_token_ids
    from r1v3.rl.rollout import HFGenerateEngine, SamplingConfig

    stage, engine = build_pair("qwen2_5_vl", tmp_path)
    model, lm = stage.model, stage.model.model.language_model
    placeholder = multimodal_token_ids(stage.processor)[0]
    with torch.no_grad():
        last = lm.layers[-1].self_attn
        last.v_proj.bias.copy_(torch.randn(last.v_proj.bias.shape, generator=torch.Generator().manual_seed(0)) * 50)
        heads = last.o_proj.weight.shape[1] // last.v_proj.bias.numel()  # grouped-query: values repeat
        direction = last.o_proj.weight @ last.v_proj.bias.repeat(heads)
        direction = lm.norm.weight * direction / direction.norm()
        model.lm_head.weight[placeholder] = 1e3 * direction / direction.norm()
    engine.sync_weights(model, None, force=True)
    prompts = prompts_for(stage.processor)
    unbanned = HFGenerateEngine(model, stage.encoder, stage.tokenizer)
    assert all(placeholder in row for row in greedy(unbanned, prompts)), "the edit makes it the argmax"
    for rollouts in (engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=12), seed=0),
                     stage.engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=12), seed=0)):
        ids = rollouts.completion_ids[rollouts.completion_mask.bool()]
        assert len(ids) > 0 and not torch.isin(ids, torch.tensor(multimodal_token_ids(stage.processor))).any()


def test_the_engine_encodes_images_with_the_trainers_tiling(tmp_path):
    """InternVL tiles an image into up to max_patches crops plus a thumbnail, per processor call.
    The trainer's settings reach vLLM's processor, so both make the same prompt tokens (image tokens
    included); an engine left at the processor's defaults does not."""
    from r1v3 import backbone as bb
    from r1v3.encoding import PromptEncoder
    from r1v3.rl.engines import build_engine
    from r1v3.rl.vllm_engine import VLLMConfig
    from r1v3.tools.tiny import build_tiny

    model_dir = build_tiny("internvl", tmp_path / "internvl")
    processor = bb.load_processor(model_dir)
    encoder = PromptEncoder(processor, max_tiles=4)
    from PIL import Image

    from r1v3.chat import render_prompt
    from r1v3.rl.rollout import Prompt

    # Wide and larger than one tile (the tiny preset's tiles are 384 px): a 2x1 grid plus a thumbnail.
    prompts = [Prompt(render_prompt(processor, "<image>\nHow many red shapes are there?", 1),
                      [Image.new("RGB", (800, 400), colour)]) for colour in ("red", "blue")]
    trainer_ids = [t["input_ids"].tolist() for t in encoder.encode_each([p.text for p in prompts],
                                                                        [p.images for p in prompts]).tokens]
    engine = build_engine("vllm", model_dir=str(model_dir), model=None, encoder=encoder, tokenizer=processor.tokenizer,
                          vllm_config=VLLMConfig(max_model_len=1024), family="internvl")
    assert engine.prompt_token_ids(prompts) == trainer_ids
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert trainer_ids[0].count(image_token) > processor.image_seq_length, "tiled: more than one crop"
    untold = build_engine("vllm", model_dir=str(model_dir), model=None, encoder=None, tokenizer=processor.tokenizer,
                          vllm_config=VLLMConfig(max_model_len=1024), family="internvl")
    assert untold.prompt_token_ids(prompts) != trainer_ids, "left at the processor's defaults it encodes one crop"


def test_a_run_whose_engine_encodes_images_differently_stops_at_once(tmp_path):
    """The stage compares the engine's prompt tokens with its own at the first rollout. Built by
    the stage, the engine gets the data module's tiling and the run trains; an engine left at the
    processor's defaults sees one crop where the trainer sees three, and the run stops in one line."""
    from lightning.pytorch import Trainer
    from PIL import Image

    from r1v3.data_modules.shards import write_shards
    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.errors import UserError
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.grpo import GRPOStage
    from r1v3.tools.tiny import build_tiny

    model_dir = build_tiny("internvl", tmp_path / "internvl")
    samples = [{"id": f"wide{i}", "question": "<image>\nWhat colour is the picture?", "answer": colour,
                "images": [Image.new("RGB", (800, 400), colour)]}
               for i, colour in enumerate(["red", "blue", "green", "red"])]
    write_shards(samples, str(tmp_path / "data" / "train-%06d.tar"))

    def fit(engine=None):
        stage = GRPOStage(str(model_dir), rollout="vllm", vllm=VLLMConfig(max_model_len=1024),
                          sampling=SamplingConfig(n=2, max_new_tokens=4), reward_fn="test_vllm.length_reward",
                          rollout_log_every=0)
        stage.engine = engine
        trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(stage, datamodule=WebDataModule(train=str(tmp_path / "data"), batch_size=2, max_tiles=4))
        return trainer

    trainer = fit()
    assert trainer.global_step == 1
    assert float(trainer.callback_metrics["train/engine_prompt_logprob_gap"]) < 1e-4, "measured, and logged"
    import gc

    gc.collect()  # that run's engine goes now, not while the next one works (see collect_engines)
    untold = VLLMEngine(str(model_dir), VLLMConfig(max_model_len=1024))
    mismatch = "encode sample 'wide.' differently: .* in the engine, .* in the trainer"
    with pytest.raises(UserError, match=mismatch) as caught:
        fit(untold)
    del caught, untold  # the traceback holds the stopped run's engine: let it go here (see collect_engines)
    gc.collect()


def test_an_sft_export_from_the_core_venv_starts_grpo_on_vllm(tmp_path, tiny_dirs, synth_dir, core_python):
    """The stages chain across the two environments: SFT exports in the core venv (no torchvision,
    so its processor has no video half), GRPO on the vLLM engine starts from that export here."""
    import os
    import subprocess

    from lightning.pytorch import Trainer

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.rl.rollout import SamplingConfig
    from r1v3.rl.vllm_engine import VLLMConfig, VLLMEngine
    from r1v3.stages.grpo import GRPOStage

    export = tmp_path / "sft"
    script = f"""
from lightning.pytorch import Trainer
from r1v3.data_modules.webdata import WebDataModule
from r1v3.stages.sft import SFTStage
stage = SFTStage({str(tiny_dirs["internvl"])!r}, val_generate=False, export_dir={str(export)!r})
Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0).fit(
    stage, datamodule=WebDataModule(train={str(synth_dir / "train")!r}, batch_size=2))
"""
    done = subprocess.run([str(core_python), "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (export / "video_preprocessor_config.json").exists(), "the export carries what vLLM's processor needs"
    stage = GRPOStage(str(export), rollout="vllm", vllm=VLLMConfig(max_model_len=512),
                      sampling=SamplingConfig(n=2, max_new_tokens=6), reward_fn="test_vllm.length_reward",
                      rollout_log_every=0)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage, datamodule=WebDataModule(train=str(synth_dir / "train"), batch_size=2))
    assert isinstance(stage.engine, VLLMEngine) and trainer.global_step == 1
    assert float(trainer.callback_metrics["train/logprob_gap"]) < 1e-3


def test_engine_threads_benchmark_smoke(tmp_path, capsys):
    from conftest import run_bench

    result = run_bench("engine_threads", ["--size", "tiny", "--repeats", "1", "--max-new-tokens", "8",
                                          "--workdir", str(tmp_path)], capsys)
    assert result["threads_after_engine"] == result["threads_before_engine"]
    assert result["update_s_before_engine"] > 0 and result["update_s_after_engine"] > 0


def test_compare_trl_one_thread_side_smoke(tmp_path):
    """The before-the-thread-fix side of bench/compare_trl.py really trains at one thread, beside a
    vLLM engine (its own process: the thread count must not leak into this one)."""
    from test_bench_smoke import _compare_trl

    result = _compare_trl(tmp_path, "r1v3-vllm-1thread")
    assert result["checks"]["threads"] == 1 and "vllm_dtype" in result["checks"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_tied_embeddings_keep_parity_after_sync(family, tmp_path):
    """Input and output embeddings tied, as in many released checkpoints: weight sync is where a
    tied pair usually goes wrong (one name pushed, the other left stale)."""
    stage, engine = build_pair(family, tmp_path, tied=True)
    model = stage.model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompts = prompts_for(stage.processor)
    assert greedy(engine, prompts) == greedy(stage.engine, prompts), "parity before training"
    train_a_little(stage, prompts)
    engine.sync_weights(stage.model, stage.trainable)
    assert greedy(engine, prompts) == greedy(stage.engine, prompts), "parity after sync"
