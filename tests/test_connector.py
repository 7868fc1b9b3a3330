"""Stage 3, connector-only tuning, through the demo's own config; and the HF export round trip."""

from pathlib import Path

import pytest
import torch

from r1v3.tools.demo import changed_groups, run_stage

REPO = Path(__file__).resolve().parents[1]
CONNECTOR = REPO / "configs" / "demo" / "connector.yaml"


def workdir_with_data(tmp_path, synth_dir) -> Path:
    (tmp_path / "data").symlink_to(synth_dir, target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_connector_stage_changes_only_the_connector(tmp_path, tiny_dirs, synth_dir, family):
    workdir = workdir_with_data(tmp_path, synth_dir)
    metrics = run_stage(CONNECTOR, workdir, "connector", 4,
                        ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                         "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "4",
                         "--model.init_args.max_new_tokens", "4", "--model.init_args.optimizer.lr", "1e-2"],
                        model_dir=tiny_dirs[family])
    assert metrics["steps"] == 4 and "val/loss" in metrics
    # Bit-identical vision and LLM weights, changed connector: compared on the exported files.
    assert changed_groups(tiny_dirs[family], workdir / "connector" / "hf") == ["connector"]


def test_connector_stage_stops_early_on_a_flat_validation_loss(tmp_path, tiny_dirs, synth_dir):
    workdir = workdir_with_data(tmp_path, synth_dir)
    # lr 0: the validation loss never improves, so EarlyStopping(patience=2) ends the run at the
    # third validation (step 3) instead of max_steps.
    metrics = run_stage(CONNECTOR, workdir, "connector", 40,
                        ["--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                         "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "4",
                         "--model.init_args.val_generate", "false", "--model.init_args.optimizer.lr", "0.0"],
                        model_dir=tiny_dirs["internvl"])
    assert metrics["steps"] == 3


def test_hf_export_reloads_with_identical_logits(tmp_path, tiny_dirs, synth_dir):
    from lightning.pytorch import Trainer
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from r1v3.data_modules.webdata import WebDataModule
    from r1v3.stages.sft import SFTStage

    stage = SFTStage(str(tiny_dirs["llava"]), max_new_tokens=4, export_dir=str(tmp_path / "hf"), val_generate=False)
    data = WebDataModule(train=str(synth_dir / "train"), batch_size=4)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    batch = next(iter(data.train_dataloader()))

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()  # plain transformers
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.get_vocab() == stage.tokenizer.get_vocab()
    stage.model.eval()
    with torch.no_grad():
        ours = stage.model(**batch["inputs"], **batch["images"]).logits
        theirs = reloaded(**batch["inputs"], **batch["images"]).logits
    assert torch.equal(ours, theirs)
