"""Published shapes counted on the meta device (``r1v3 shapes``) come within 3% of each model card's
total, with the module groups and FSDP units the trainer would use."""

import json

import pytest

from r1v3.tools import shapes

# The totals the cards state (r1v3/tools/shapes.py cites each source).
CARD_TOTALS = {"qwen3_vl_8b": 8.77e9, "qwen3_vl_30b_a3b": 31.07e9, "internvl3_5_8b": 8.5e9, "internvl3_38b": 38.4e9}


def test_published_shapes_match_their_model_cards(capsys):
    assert shapes.shapes_main(["--json"]) == 0
    results = {r["model"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert results.keys() == CARD_TOTALS.keys()
    for name, total in CARD_TOTALS.items():
        result = results[name]
        assert abs(result["total"] / total - 1) <= 0.03, (name, result["total"])
        assert sum(result["groups"].values()) == result["total"] and all(result["groups"].values())
    # InternVL3.5-8B's card splits it as 0.3B vision + 8.2B language: r1v3's vision group is the ViT,
    # the MLP projector (0.03B) its connector.
    internvl = results["internvl3_5_8b"]["groups"]
    assert round(internvl["vision"] / 1e9, 1) == 0.3 and round(internvl["llm"] / 1e9, 1) == 8.2
    moe = results["qwen3_vl_30b_a3b"]["fsdp_units"]
    assert moe["Qwen3VLMoeTextSparseMoeBlock"]["count"] == moe["Qwen3VLMoeTextDecoderLayer"]["count"] == 48
    # each MoE layer is its own unit: the decoder-layer units keep only attention and norms
    assert moe["Qwen3VLMoeTextDecoderLayer"]["largest"] < moe["Qwen3VLMoeTextSparseMoeBlock"]["largest"] / 20
    dense = results["qwen3_vl_8b"]
    assert "deepstack" not in json.dumps(dense["fsdp_units"]) and dense["groups"]["connector"] > 1e8


def test_a_local_checkpoint_is_counted_too(tiny_dirs, capsys):
    assert shapes.shapes_main([str(tiny_dirs["qwen3_vl_moe"])]) == 0
    out = capsys.readouterr().out
    assert "connector" in out and "Qwen3VLMoeTextSparseMoeBlock" in out
    with pytest.raises(SystemExit, match="neither a published shape"):
        shapes.shapes_main(["no_such_model"])
