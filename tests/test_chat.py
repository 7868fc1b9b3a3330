from r1v3 import chat
from r1v3.rewards.accuracy import extract_final_answer, is_correct, matches_reference


def test_target_round_trips_through_parser():
    target = chat.render_target("I see 3 red shapes. Wait, let me recount.", "3")
    parsed = chat.parse_response(target)
    assert parsed.well_formed
    assert parsed.think == "I see 3 red shapes. Wait, let me recount."
    assert parsed.boxed == "3"


def test_parser_rejects_missing_or_broken_think():
    assert not chat.parse_response("The answer is \\boxed{3}").well_formed
    assert not chat.parse_response("<think>no close tag \\boxed{3}").well_formed
    assert not chat.parse_response("<think>ok</think>   ").well_formed
    assert not chat.parse_response("<think>a<think>b</think> x").well_formed


def test_last_boxed_handles_nesting_and_unbalanced():
    assert chat.last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert chat.last_boxed("\\boxed{\\frac{1}{2}") is None
    assert chat.last_boxed("nothing") is None


def test_messages_interleave_images_and_add_unmarked_ones_first():
    msgs = chat.build_messages("<image 1> left, <image 2> right?", 3)
    kinds = [p["type"] for p in msgs[0]["content"]]
    assert kinds == ["image", "image", "text", "image", "text"]
    msgs = chat.build_messages("Pick one", 0, options=["red", "blue"])
    assert msgs[0]["content"][0]["text"].endswith("A. red\nB. blue")


def test_accuracy_rules():
    assert is_correct("<think>x</think> \\boxed{7}", "7")
    assert is_correct("<think>x</think> \\boxed{7.0}", "7")
    assert not is_correct("<think>x</think> \\boxed{8}", "7")
    opts = ["left", "right"]
    assert is_correct("<think>x</think> \\boxed{B}", "B", opts)
    assert is_correct("<think>x</think> \\boxed{right}", "B", opts)
    assert not is_correct("<think>x</think> \\boxed{A}", "B", opts)
    assert extract_final_answer("<think>x</think> The answer is B", opts) == "B"
    assert not matches_reference(None, "B", opts)
