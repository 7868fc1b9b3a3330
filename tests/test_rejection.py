"""Rejection sampling writes exactly the responses the verifier accepts (real tiny model)."""

import io
import json
import tarfile

from lightning.pytorch import Trainer

from r1v3.chat import parse_response
from r1v3.data_modules.synthetic import write_synthetic
from r1v3.data_modules.webdata import WebDataModule
from r1v3.tools.rejection import rejection_sample
from r1v3.rewards import format_reward, is_correct
from r1v3.stages.base import OptimizerConfig
from r1v3.stages.sft import SFTStage


def test_rejection_sampling_keeps_only_verified(tmp_path, tiny_dirs):
    data = tmp_path / "data"
    write_synthetic(data, n_train=640, n_val=16, n_ood=8, seed=2, train_tasks=("colour",))
    stage = SFTStage(str(tiny_dirs["internvl"]), val_generate=False,
                     optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.05))
    Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(
        stage, datamodule=WebDataModule(train=str(data / "train"), batch_size=16))
    model_dir = stage.export_hf(tmp_path / "sft")

    report = rejection_sample(str(model_dir), str(data / "val"), str(tmp_path / "rs" / "rs-%06d.tar"), k=4,
                              max_new_tokens=48, batch_size=8, reward_kwargs={"num_workers": 1})
    assert report["questions"] == 16 and report["responses"] == 64
    assert report["kept"] > 0, "a 60-step SFT model answers some colour questions right"
    written = []
    for shard in report["shards"]:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    written.append(json.load(io.BytesIO(tar.extractfile(member).read())))
    assert len(written) == report["kept"]
    for record in written:
        response = record["response"]
        assert is_correct(response, record["answer"], record["options"])
        assert format_reward(response) == 1.0
        assert record["trace"] == parse_response(response).think.strip() and record["trace"]
        assert record["source"] == "rejection"
    assert abs(sum(report["per_question"].values()) * 4 - report["kept"]) < 1e-9
