"""Rewards: format, tiered accuracy (rules → math-verify in killable workers → optional judge),
the worker pool's timeout/crash handling, a fuzz batch of hostile responses, and load_reward."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from r1v3.rewards import R1V3Reward, VerifierPool, accuracy_only, load_reward
from r1v3.rewards.accuracy import is_correct, math_equivalent, matches_reference
from r1v3.rewards.format import format_reward

OPTS = ["left", "right", "\\frac{\\pi}{4}"]


def resp(answer: str, think: str = "some reasoning") -> str:
    return f"<think>{think}</think> The answer is \\boxed{{{answer}}}."


def item(response: str, answer: str, options=None, question: str = "What is it?") -> dict:
    return {"question": question, "answer": answer, "options": options, "response": response}


@pytest.fixture(scope="module")
def reward():
    fn = R1V3Reward()
    yield fn
    fn.close()


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    from r1v3.tools.tiny import build_tiny

    return build_tiny("internvl", tmp_path_factory.mktemp("judge") / "internvl")


def test_format_reward():
    assert format_reward(resp("3")) == 1.0
    assert format_reward("<think>x</think>plain answer") == 1.0
    assert format_reward("\\boxed{3}") == 0.0
    assert format_reward("<think>x</think>   ") == 0.0
    assert format_reward("<think>never closed \\boxed{3}") == 0.0
    assert format_reward("") == 0.0
    # exactly one pair: a second closing or opening tag in the answer is not the format
    assert format_reward("<think>a</think>b</think>c") == 0.0
    assert format_reward("<think>a</think>b<think>c</think>d") == 0.0
    assert format_reward("<think>a</think>b <think>") == 0.0
    assert format_reward("<think>a</think>b  \boxed{3}") == 1.0


def test_rules_stay_in_process_and_bounded():
    assert matches_reference("1,000", "1000")
    assert not matches_reference("2,3", "23")  # a pair, not a thousands separator
    assert matches_reference("$\\dfrac{1}{2}$", "0.5")
    assert matches_reference("\\text{right}", "B", OPTS)
    assert matches_reference("(B)", "right", OPTS)  # letter answer, option-text reference
    assert matches_reference("3", "3", ["a"])  # a non-letter reference with options never raises
    start = time.perf_counter()
    assert not is_correct(resp("10^{10^{10^{10}}}"), "1")  # SFT validation: no sympy, no hang
    assert time.perf_counter() - start < 1.0


def test_a_leading_dot_is_a_decimal_point(reward):
    # ".5" is one half, not five: only a trailing sentence period may be dropped.
    assert not matches_reference("5", ".5") and not matches_reference(".5", "5")
    assert matches_reference("0.5", ".5") and matches_reference(".5", "0.5")
    assert matches_reference("5.", "5") and matches_reference("$.5$.", "0.5")
    assert not is_correct(resp(".5"), "5") and is_correct(resp(".5"), "0.5")
    # The GRPO reward (rules, then math-verify in its workers) agrees.
    out = reward([item(resp(".5"), "5"), item(resp("5"), ".5"), item(resp("0.5"), ".5")])
    assert [o["accuracy"] for o in out] == [0, 0, 1]


def test_math_verify_equivalence_in_process():
    assert math_equivalent("0.5", "\\frac{1}{2}")
    assert math_equivalent("1+x", "x+1")
    assert not math_equivalent("4", "5")


def test_accuracy_tiers(reward):
    out = reward([
        item(resp("42"), "42"),
        item(resp("\\frac{1}{2}"), "0.5"),
        item(resp("x+1"), "1+x"),
        item(resp("\\frac{\\pi}{2}"), "\\pi/2"),
        item(resp("43"), "42"),
        item("<think>x</think> It is 42.", "42"),  # no box: not graded
        item(resp("B"), "B", OPTS),
        item(resp("(B)"), "B", OPTS),
        item(resp("right"), "B", OPTS),
        item(resp("\\pi/4"), "C", OPTS),  # option text equivalent by math-verify
        item(resp("A"), "B", OPTS),
        item("<think>x</think> So the answer is B", "B", OPTS),
    ])
    assert [o["accuracy"] for o in out] == [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1]
    assert out[2]["source"] == out[3]["source"] == out[9]["source"] == "math_verify"
    assert out[0]["source"] == "rule" and out[4]["source"] is None
    assert out[5]["extracted"] is None and out[0]["extracted"] == "42"
    assert not any(o["timed_out"] for o in out)


def test_reward_weights(reward):
    good, wrong, unformatted = item(resp("7"), "7"), item(resp("8"), "7"), item("\\boxed{7}", "7")
    out = reward([good, wrong, unformatted])
    assert [o["reward"] for o in out] == pytest.approx([1.0, 0.2, 0.8])
    assert [o["format"] for o in out] == [1, 1, 0]
    with R1V3Reward(acc_weight=0.5, format_weight=0.5, use_math_verify=False) as custom:
        assert [o["reward"] for o in custom([good, wrong, unformatted])] == pytest.approx([1.0, 0.5, 0.5])


def test_pool_timeout_crash_and_reuse():
    with VerifierPool(num_workers=2, timeout_s=0.5) as pool:
        pool.warmup()
        first = pool.map(math_equivalent, [("2", "2")])
        pids = sorted(w.proc.pid for w in pool._workers if w is not None)
        assert first[0].ok and [o.value for o in pool.map(math_equivalent, [("3", "3"), ("3", "4")])] == [True, False]
        assert sorted(w.proc.pid for w in pool._workers if w is not None) == pids  # kept alive
        start = time.perf_counter()
        out = pool.map(time.sleep, [(30,), (0,)])
        assert [o.status for o in out] == ["timeout", "ok"]
        assert time.perf_counter() - start < 10
        out = pool.map(os._exit, [(3,)])  # a worker that dies mid-item (like a segfault)
        assert out[0].status == "error"
        assert (pool.timeouts, pool.errors) == (1, 1) and pool.restarts >= 2
        assert pool.map(math_equivalent, [("0.5", "\\frac{1}{2}")])[0].value is True
        workers = [w.proc for w in pool._workers if w is not None]
    assert workers and not any(p.is_alive() for p in workers)
    with pytest.raises(RuntimeError):
        pool.map(math_equivalent, [("1", "1")])


SLOW_MAIN = """
import time
time.sleep(2.0)  # a trainer script's top-level imports (torch, lightning) take seconds
if __name__ == "__main__":
    import os
    from r1v3.rewards import VerifierPool
    from r1v3.rewards.accuracy import math_equivalent
    pool = VerifierPool(num_workers=2, timeout_s=1.0)
    print(*[o.status for o in pool.map(math_equivalent, [("0.5", "1/2"), ("2", "2.0")])])
    print(*[w.proc.pid for w in pool._workers], flush=True)
    os._exit(0)  # no atexit, no close(): the owner just vanishes
"""


def test_workers_skip_slow_main_and_exit_with_owner(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SLOW_MAIN)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stderr
    # Workers must not re-run the owner's slow top-level code, or every first item times out.
    assert lines[0].split() == ["ok", "ok"]
    pids = [int(x) for x in lines[1].split()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_fuzz_batch(reward, tmp_path):
    marker = f"/tmp/PWNED_{uuid.uuid4().hex}"
    pwned = tmp_path / "pwned"
    injections = [
        f"__import__('os').system('touch {marker}')",
        f"open('{pwned}','w')",
        f"exec(\"open('{pwned}','w')\")",
        f"eval(compile('open(\"{pwned}\",\"w\")','x','exec'))",
        "().__class__.__base__.__subclasses__()",
        f"\\text{{{{__import__('os').system('touch {marker}')}}}}",
    ]
    huge = "10^{10^{10^{10}}}"
    megabyte = "x" * (1 << 20)
    items = [item(resp(huge), "1")]
    items += [item(resp(s), "1") for s in injections]
    items += [item(resp("1"), s) for s in injections[:2]]  # in the reference
    items += [item(resp(injections[0]), "A", OPTS, question=injections[1])]
    items += [
        item(megabyte, "1"),
        item(resp(megabyte), "1"),
    ]
    long_think = len(items)
    items += [
        item(resp("7", think=megabyte), "7"),
        item("<think>" + "\\frac{" * 5000 + "</think>\\boxed{" + "\\frac{" * 5000, "1"),
        item(resp("\\frac{1}{" * 300 + "2" + "}" * 300), "1"),
        item(resp("\\sqrt{" * 5000 + "2" + "}" * 5000), "1"),
        item(resp("}}}{{{\\frac{"), "1"), item("<think>}{</think>}}}\\boxed{", "1"),
        item(resp(b"\xff\xfe".decode("utf-8", "replace")), "1"),
        item(resp("\ud800"), "\ud800"), item(resp("1"), "\udfff"),
        item(b"<think>\xff</think> \\boxed{1}", "1"),
        item(resp("9^{9^{9^{9}}}"), "2", OPTS),
        {"response": None, "answer": 3},
        {},
        "not a dict",
    ]
    start = time.perf_counter()
    before = reward.stats["timeouts"]
    out = reward(items)
    elapsed = time.perf_counter() - start
    assert len(out) == len(items)
    for row in out:
        assert 0.0 <= row["reward"] <= 1.0 and row["accuracy"] in (0, 1) and row["format"] in (0, 1)
    assert out[0]["timed_out"] and out[0]["accuracy"] == 0 and out[0]["reward"] == pytest.approx(0.2)
    assert reward.stats["timeouts"] > before
    assert out[long_think]["accuracy"] == 1  # a 1 MB think block before a correct box
    assert elapsed < 60
    assert not os.path.exists(marker) and not pwned.exists()
    # The pool still works after the kills.
    after = reward([item(resp("x+1"), "1+x"), item(resp("\\frac{1}{2}"), "0.5")])
    assert [o["accuracy"] for o in after] == [1, 1] and after[0]["source"] == "math_verify"
    assert set(reward.stats) >= {"timeouts", "errors", "judge_calls", "judge_flips"}


def test_fake_judges_or_semantics_and_errors():
    items = [item(resp("8"), "7"), item(resp("7"), "7")]
    with R1V3Reward(judge=lambda q, r, resp: True, use_math_verify=False) as fn:
        out = fn(items)
        assert [o["accuracy"] for o in out] == [1, 1] and out[0]["source"] == "judge"
        assert fn.stats["judge_flips"] == 1 and fn.stats["judge_calls"] == 1  # rules already passed item 2

    def broken(q, r, resp):
        raise RuntimeError("judge server down")

    with R1V3Reward(judge=broken, use_math_verify=False) as fn:
        out = fn(items)
        assert [o["accuracy"] for o in out] == [0, 1]
        assert fn.stats["errors"] == 1 and fn.stats["judge_errors"] == 1 and fn.stats["judge_flips"] == 0

    with R1V3Reward(judge=lambda q, r, resp: "no", use_math_verify=False) as fn:
        assert fn(items)[0]["accuracy"] == 0  # a non-boolean verdict is not a yes


def test_hf_judge_plumbing(tiny_judge_dir):
    from r1v3.rewards.judge import HFJudge

    judge = HFJudge(str(tiny_judge_dir), max_new_tokens=4)
    assert isinstance(judge("What is 1+1? <image>", "2", resp("3") + "<|im_end|>\ud800"), bool)
    verdicts = judge.judge_batch([("q", "2", resp("3")), ("a longer question " * 20, "7", "no think")])
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)
    with R1V3Reward(judge="r1v3.rewards.judge.HFJudge", use_math_verify=False,
                    judge_kwargs={"model_path": str(tiny_judge_dir), "max_new_tokens": 2}) as fn:
        out = fn([item(resp("8"), "7"), item(resp("7"), "7")])
        assert out[1]["accuracy"] == 1 and fn.stats["judge_calls"] == 1


def test_load_reward():
    fn = load_reward("r1v3.rewards.R1V3Reward", {"acc_weight": 1.0, "format_weight": 0.0,
                                                 "use_math_verify": False})
    assert isinstance(fn, R1V3Reward) and fn([item(resp("7"), "7")])[0]["reward"] == 1.0
    assert load_reward("r1v3.rewards.accuracy_only") is accuracy_only
    assert accuracy_only([item(resp("7"), "7"), item(resp("8"), "7")])[1]["reward"] == 0.0
    with pytest.raises(ImportError, match="no_such_pkg.rewards.Thing"):
        load_reward("no_such_pkg.rewards.Thing")
    with pytest.raises(ImportError, match="r1v3.rewards.NoSuchReward"):
        load_reward("r1v3.rewards.NoSuchReward")
    with pytest.raises(ValueError, match="dotted import path"):
        load_reward("R1V3Reward")
    with pytest.raises(ValueError, match="dotted import path"):
        load_reward("os.system('x')")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward("r1v3.rewards.accuracy.LETTERS")
