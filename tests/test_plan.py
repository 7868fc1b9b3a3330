"""``r1v3 plan`` on the paper's 38B shape (meta device, no weights): the total, the per-rank terms
against the totals divided by the ranks, the verdicts docs/planning.md works out by hand, and the
``--plan`` check that stops a ``fit`` before any weight loads."""

import json

import pytest

from r1v3.tools import plan

GRPO_38B = ["--config", "configs/r1v3_38b/grpo.yaml", "--config", "configs/strategies/fsdp2.yaml",
            "--model", "internvl3_38b", "--gpu-memory", "80", "--json"]


@pytest.fixture(scope="module")
def repo(request):
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(old)


def run(argv, capsys) -> dict:
    assert plan.plan_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_38b_plan_shards_its_state_over_the_ranks(repo, capsys):
    result = run(GRPO_38B + ["--host-memory", "1024"], capsys)
    total, ranks = result["total_params"], result["ranks"]
    assert abs(total / 38.4e9 - 1) <= 0.01 and ranks == 32  # 4 nodes x 8 GPUs, from the config
    terms = result["terms_gb"]
    # fp32 master weights, gradients of every trained parameter, two fp32 AdamW moments, / 32 ranks
    assert terms["parameters"] == pytest.approx(total * 4 / ranks / 1e9, abs=1e-3)
    assert terms["gradients"] == pytest.approx(result["trainable_params"] * 4 / ranks / 1e9, abs=1e-3)
    assert terms["optimizer"] == pytest.approx(result["trainable_params"] * 8 / ranks / 1e9, abs=1e-3)
    # docs/planning.md by hand: 8,192 tokens x 151,674 vocabulary x (2 + 4 + 4) bytes of logits
    assert terms["logits"] == pytest.approx(8192 * 151674 * 10 / 1e9, abs=1e-3)
    assert result["fits"], result["verdict"]


def test_verdicts_worked_out_by_hand(repo, capsys):
    # docs/planning.md: a node's 8 sleeping engines park 76.8 GB / TP 4 each in host memory
    small_host = run(GRPO_38B + ["--host-memory", "128"], capsys)
    assert not small_host["fits"] and "153.6 GB per node" in small_host["verdict"]
    assert "largest term host_vllm_sleep" in small_host["verdict"]
    assert small_host["terms_gb"]["host_load"] == pytest.approx(38.39e9 * 2 / 32 / 1e9, abs=0.01)  # a shard
    # one node: 38.4B x 16 bytes / 8 ranks = 76.8 GB of sharded state, plus vLLM's 48 GB in rollouts
    one_node = run(GRPO_38B + ["--host-memory", "1024", "--gpus", "8"], capsys)
    assert not one_node["fits"] and "124.8 GB per rank in rollouts" in one_node["verdict"]
    assert "largest term vllm_rollout (48.0 GB)" in one_node["verdict"]
    # the recipe's old micro-batch: the logits of 32,768 tokens are the largest term
    big_micro = run(GRPO_38B + ["--host-memory", "1024", "--model.init_args.micro_batch_tokens", "32768"], capsys)
    assert not big_micro["fits"] and "largest term logits" in big_micro["verdict"]


def test_every_38b_stage_has_a_plan(repo, capsys):
    for stage in ("sft", "grpo", "connector"):
        result = run(["--config", f"configs/r1v3_38b/{stage}.yaml", "--config", "configs/strategies/fsdp2.yaml",
                      "--model", "internvl3_38b", "--gpu-memory", "80", "--host-memory", "1024", "--json"], capsys)
        assert result["fits"], (stage, result["verdict"])


def test_fit_with_plan_stops_before_loading(tmp_path, tiny_dirs, capsys):
    from r1v3.cli import main

    config = tmp_path / "big.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1}}
model:
  class_path: r1v3.stages.sft.SFTStage
  init_args: {{model_path: {tiny_dirs['internvl']}}}
data:
  class_path: r1v3.data_modules.webdata.WebDataModule
  init_args: {{train: nowhere, batch_size: 1, max_prompt_length: 100000000}}
""")
    # 10^8 tokens per micro-batch cannot fit this machine: one error line, before anything loads
    assert main(["fit", "--config", str(config), "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r1v3: error: plan: does not fit")


def test_a_lora_plan_counts_the_adapters_and_loads_no_reference(repo, capsys):
    # configs/variants/lora.yaml on the 38B recipe: rank-16 adapters on every linear layer of the
    # Qwen2.5-32B language model (64 layers; q, o 5120+5120, k, v 5120+1024, gate, up, down
    # 5120+27648 wide: 131,072 per layer), the connector trained fully, and the KL reference is the
    # policy with its adapters off
    lora = GRPO_38B + ["--config", "configs/variants/lora.yaml", "--host-memory", "1024",
                       "--model.init_args.kl_coef", "0.01"]
    full = run(GRPO_38B + ["--host-memory", "1024", "--model.init_args.kl_coef", "0.01"], capsys)
    result = run(lora, capsys)
    assert result["adapter_params"] == 16 * 64 * 131_072
    assert result["total_params"] == full["total_params"] + result["adapter_params"]
    terms, ranks = result["terms_gb"], result["ranks"]
    assert result["trainable_params"] < full["trainable_params"] / 100
    assert terms["gradients"] == pytest.approx(result["trainable_params"] * 4 / ranks / 1e9, abs=1e-3)
    assert terms["reference"] == 0 < full["terms_gb"]["reference"]
    assert terms["host_load"] == pytest.approx(full["terms_gb"]["host_load"] / 2, rel=0.01)
