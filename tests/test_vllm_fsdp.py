"""GRPO with the embedded vLLM engine under FSDP2: 2 CPU processes over gloo (the vLLM tier).

Each rank runs its own in-process vLLM engine on its own rollouts; after each sharded update every
rank gathers the full weights (a collective) and pushes them into its engine. The run is a
subprocess (tests/vllm_fsdp_driver.py) that Lightning's launcher forks into its two ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from test_fsdp import run_subprocess

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("need_vllm")]

DRIVER = Path(__file__).with_name("vllm_fsdp_driver.py")


@pytest.mark.parametrize("preconfigure", [False, True], ids=["built-in-fit", "built-before-fit"])
def test_grpo_vllm_sharded_update_keeps_greedy_parity(tmp_path, tiny_dirs, synth_dir, preconfigure):
    spec = {"model": str(tiny_dirs["internvl"]), "train": str(synth_dir / "train"), "out": str(tmp_path),
            "max_steps": 2, "lr": 1e-3, "preconfigure": preconfigure}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = run_subprocess([sys.executable, str(DRIVER), str(tmp_path / "spec.json")])
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for rank in ranks:
        assert rank["sharded"] and rank["param_types"] == ["DTensor"] and rank["engine_is_vllm"]
        assert rank["global_step"] == 2
        assert rank["sync_tensors"] == rank["n_params"]  # every trainable tensor was pushed
        # Step 2 sampled from the engine that step 1's sharded update was pushed into: the trainer
        # scores those samples as the engine did (float32 on both sides).
        assert 0 <= rank["logprob_gap"] < 1e-3
        # The engine, fed by the sharded update through the gathered sync, decodes exactly as HF
        # does on the gathered full weights ...
        assert rank["vllm"] == rank["hf_updated"], f"rank {rank['rank']}: engine out of sync"
    # ... both ranks' engines hold the same weights ...
    assert ranks[0]["vllm"] == ranks[1]["vllm"]
    # ... and those weights are not the initial ones (else parity would prove nothing).
    assert ranks[0]["hf_updated"] != ranks[0]["hf_initial"]
