"""Rejection sampling writes exactly the responses the verifier accepts (real tiny model)."""

import io
import json
import tarfile

from r1v3.chat import parse_response
from r1v3.tools.rejection import rejection_sample
from r1v3.rewards import format_reward, is_correct


def test_rejection_sampling_keeps_only_verified(tmp_path, sft_start):
    model_dir, data = sft_start  # a weak SFT model of the colour task: some answers right and well formed
    report = rejection_sample(str(model_dir), str(data / "val"), str(tmp_path / "rs" / "rs-%06d.tar"), k=4,
                              max_new_tokens=48, batch_size=8, reward_kwargs={"num_workers": 1}, limit=16)
    assert report["questions"] == 16 and report["responses"] == 64
    assert 0 < report["kept"] < 64, "the verifier keeps some responses and rejects others"  # 10 when written
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
