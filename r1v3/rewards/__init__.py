"""Reward functions for the GRPO stage.

A reward function is any callable ``fn(items: list[dict]) -> list[dict]``, named by import path in
the config and built by :func:`load_reward`. Input items carry ``question``, ``answer`` (the
reference), ``options`` (list or None) and ``response``; each output dict carries at least
``reward`` (float).

:class:`R1V3Reward` is Skywork-R1V3's reward (arXiv 2507.06167, §3.2):
``reward = 0.8·R_acc + 0.2·R_format``, where R_format is the ``<think>…</think>``-then-answer check
(:mod:`.format`) and R_acc = 1 iff the rule check OR the optional model judge (:mod:`.judge`)
accepts the final answer. The rule check is tiered, cheapest first: normalized text / option
letter / number equality in-process (:mod:`.accuracy`), then math-verify equivalence in killable
worker processes with a per-item time limit (:mod:`.pool`). The judge is asked only about items
the rules scored 0.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Any, Callable

from r1v3.rewards.accuracy import (extract_final_answer, is_correct, math_equivalent,
                                   matches_reference, verify_target)
from r1v3.rewards.format import format_reward
from r1v3.rewards.pool import VerifierPool

__all__ = ["R1V3Reward", "accuracy_only", "load_reward", "format_reward", "is_correct",
           "extract_final_answer", "matches_reference", "VerifierPool"]

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _options(value: Any) -> list[str] | None:
    return [_text(v) for v in value] if value else None


def _row(reward: float, acc: int, fmt: int, extracted: str | None, timed_out: bool = False,
         source: str | None = None) -> dict:
    return {"reward": reward, "accuracy": acc, "format": fmt, "timed_out": timed_out,
            "extracted": extracted, "source": source}


def _is_yes(verdict: Any) -> bool:
    # Only real truth values count: a judge returning the string "no" must not read as True.
    return verdict is True or (not isinstance(verdict, str) and bool(verdict == 1))


class R1V3Reward:
    """``reward = acc_weight·accuracy + format_weight·format`` for each item.

    ``judge`` is an import path to a judge (a class is instantiated with ``judge_kwargs``) or a
    judge callable itself; see :mod:`r1v3.rewards.judge` for the protocol. Output dicts also carry
    ``accuracy`` and ``format`` (0/1), ``timed_out``, ``extracted`` (the final answer or None) and
    ``source`` (what granted the accuracy: ``rule``, ``math_verify``, ``judge`` or None).
    """

    def __init__(self, acc_weight: float = 0.8, format_weight: float = 0.2, timeout_s: float = 1.0,
                 num_workers: int = 2, judge: str | Callable[..., bool] | None = None,
                 judge_kwargs: dict | None = None, use_math_verify: bool = True,
                 max_verify_chars: int = 4096):
        self.acc_weight, self.format_weight = float(acc_weight), float(format_weight)
        self.use_math_verify = use_math_verify
        # No K12 final answer is this long; longer boxes are scored by the rules alone rather than
        # costing a timeout and a worker restart each.
        self.max_verify_chars = max_verify_chars
        self.pool = VerifierPool(num_workers=num_workers, timeout_s=timeout_s) if use_math_verify else None
        if isinstance(judge, str):
            judge = load_reward(judge, judge_kwargs)
        elif judge_kwargs:
            raise ValueError("judge_kwargs given but judge is not an import path")
        self.judge = judge
        self._stats = dict(items=0, math_verify_calls=0, timeouts=0, errors=0, judge_calls=0,
                           judge_flips=0, judge_errors=0)

    @property
    def stats(self) -> dict:
        """Cumulative counters since construction."""
        out = dict(self._stats)
        out["worker_restarts"] = self.pool.restarts if self.pool else 0
        return out

    def __call__(self, items: list[dict]) -> list[dict]:
        scored: list[dict] = []
        checks: list[tuple[int, str, str]] = []  # (index, target, extracted) for math-verify
        judge_inputs: dict[int, tuple[str, str, str]] = {}
        for index, item in enumerate(items):
            try:
                response, reference = _text(item.get("response")), _text(item.get("answer"))
                question = _text(item.get("question"))
                options = _options(item.get("options"))
                fmt = int(format_reward(response))
                extracted = extract_final_answer(response, options)
                acc = int(matches_reference(extracted, reference, options))
                target = None if acc or self.pool is None else verify_target(extracted, reference, options)
            except Exception:  # noqa: BLE001 - one malformed item must not sink the batch
                log.warning("reward: item %d could not be scored", index, exc_info=True)
                self._stats["errors"] += 1
                scored.append(_row(0.0, 0, 0, None))
                continue
            scored.append(_row(0.0, acc, fmt, extracted, source="rule" if acc else None))
            judge_inputs[index] = (question, reference, response)
            if target and max(len(target), len(extracted)) <= self.max_verify_chars:
                checks.append((index, target, extracted))
        self._stats["items"] += len(items)

        if checks:
            self._stats["math_verify_calls"] += len(checks)
            outcomes = self.pool.map(math_equivalent, [(target, got) for _, target, got in checks])
            for (index, _, _), outcome in zip(checks, outcomes):
                if outcome.status == "timeout":
                    self._stats["timeouts"] += 1
                    scored[index]["timed_out"] = True
                elif outcome.status == "error":
                    self._stats["errors"] += 1
                elif outcome.value:
                    scored[index].update(accuracy=1, source="math_verify")

        if self.judge is not None:
            self._apply_judge(judge_inputs, scored)
        for row in scored:
            row["reward"] = self.acc_weight * row["accuracy"] + self.format_weight * row["format"]
        return scored

    def _apply_judge(self, inputs: dict[int, tuple[str, str, str]], scored: list[dict]) -> None:
        todo = [i for i in inputs if not scored[i]["accuracy"]]
        if not todo:
            return
        triples = [inputs[i] for i in todo]
        self._stats["judge_calls"] += len(todo)
        verdicts: list[Any] = [None] * len(todo)
        batch = getattr(self.judge, "judge_batch", None)
        try:
            if callable(batch):
                verdicts = list(batch(triples))
                if len(verdicts) != len(triples):
                    raise ValueError(f"judge_batch returned {len(verdicts)} verdicts for {len(triples)} items")
            else:
                verdicts = [self._judge_one(triple) for triple in triples]
        except Exception as err:  # noqa: BLE001 - a broken judge scores by rules, never crashes
            self._judge_failed(err, len(triples))
            verdicts = [None] * len(todo)
        for index, verdict in zip(todo, verdicts):
            if verdict is not None and _is_yes(verdict):
                self._stats["judge_flips"] += 1
                scored[index].update(accuracy=1, source="judge")

    def _judge_one(self, triple: tuple[str, str, str]) -> Any:
        try:
            return self.judge(*triple)
        except Exception as err:  # noqa: BLE001
            self._judge_failed(err, 1)
            return None

    def _judge_failed(self, err: Exception, count: int) -> None:
        if not self._stats["judge_errors"]:
            log.warning("reward judge raised %s; those items are scored by the rules alone "
                        "(counted in stats['judge_errors'])", type(err).__name__)
        self._stats["judge_errors"] += count
        self._stats["errors"] += count

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "R1V3Reward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def accuracy_only(items: list[dict]) -> list[dict]:
    """A plain-function reward: the in-process rule check alone, reward = accuracy. It shows that
    any callable with this signature works, and needs no worker processes."""
    out = []
    for item in items:
        response, options = _text(item.get("response")), _options(item.get("options"))
        extracted = extract_final_answer(response, options)
        acc = int(matches_reference(extracted, _text(item.get("answer")), options))
        out.append(_row(float(acc), acc, int(format_reward(response)), extracted,
                        source="rule" if acc else None))
    return out


def _resolve(spec: str) -> Any:
    parts = spec.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue  # this prefix is not a module: the rest may be attributes of a shorter one
            raise ImportError(f"importing {module_name!r} for {spec!r} failed: {err}") from err
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ImportError(f"cannot import {spec!r}: module {module_name!r} has no attribute "
                              f"{'.'.join(parts[cut:])!r}") from None
        return obj
    raise ImportError(f"cannot import {spec!r}: no module named {parts[0]!r}")


def load_reward(spec: str, kwargs: dict | None = None) -> Callable:
    """Import ``spec`` ("package.module.Name") and return it as a callable: classes are
    instantiated with ``kwargs``; functions get ``kwargs`` bound with :func:`functools.partial`.
    Plain import and getattr only; nothing is evaluated."""
    if not isinstance(spec, str) or "." not in spec.strip(".") or any(not p.isidentifier() for p in spec.split(".")):
        raise ValueError(f"reward spec {spec!r} is not a dotted import path such as "
                         "'r1v3.rewards.R1V3Reward'")
    obj = _resolve(spec)
    if inspect.isclass(obj):
        try:
            return obj(**(kwargs or {}))
        except TypeError as err:
            raise TypeError(f"cannot instantiate {spec!r} with {sorted(kwargs or {})}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a callable or class")
    return functools.partial(obj, **kwargs) if kwargs else obj
