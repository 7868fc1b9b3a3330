"""MMMU-style evaluation: k samples per question, scored and summarised (the pure part of
:class:`r1v3.stages.evaluate.EvalStage`).

Protocol (Skywork-R1V3, arXiv 2507.06167, §4; docs/design.md §1): sample k responses per question at
temperature 1.0 and report the mean accuracy over all samples. A response is correct when its final
answer (the last ``\\boxed{…}``, or for multiple choice the option letter or the option's text)
matches the reference by the rules of :mod:`r1v3.rewards.accuracy`, or, for open answers, by
math-verify in killable workers (:class:`r1v3.rewards.R1V3Reward` with the format weight at 0).

Everything here is deterministic and free of model code, so the tests drive it with hand-written
responses and the stage uses the same functions on real rollouts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torchmetrics import MeanMetric

from r1v3.backbone import BackboneError
from r1v3.rewards.blind_claims import DEFAULT_PHRASES, claim_pattern, has_blind_claim
from r1v3.chat import THINK_CLOSE, THINK_OPEN

THINKING_MODES = ("slow", "nothink", "nowait")
# The reflection words NoWait suppresses first (Wang et al., "Wait, We Don't Need to 'Wait'!",
# arXiv 2506.08343); its full list is longer and matches substrings, ours is whole tokens only.
NOWAIT_WORDS = ("Wait", "Alternatively", "Hmm")
# nothink: the assistant turn starts with an empty, closed think block, as Qwen3's chat template
# does for enable_thinking=False. A prefill binds any model trained on <think>…</think>, whereas
# an instruction to skip thinking depends on how well the model follows it.
NOTHINK_PREFILL = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
UNKNOWN_SUBJECT = "unknown"


class EvalConfigError(BackboneError):
    """A bad evaluation setting (a BackboneError, so the CLI prints it as one line)."""


def apply_thinking_mode(prompt_text: str, mode: str) -> str:
    """The prompt the engine continues: unchanged for ``slow`` and ``nowait`` (the ban acts at
    decoding), the rendered prompt plus :data:`NOTHINK_PREFILL` for ``nothink``."""
    if mode not in THINKING_MODES:
        raise EvalConfigError(f"thinking mode must be one of {THINKING_MODES}, got {mode!r}")
    return prompt_text + NOTHINK_PREFILL if mode == "nothink" else prompt_text


def banned_token_ids(tokenizer, words: Sequence[str] = NOWAIT_WORDS) -> list[int]:
    """Ids of every vocabulary token whose decoded text, stripped of whitespace, is one of
    ``words``: ``Wait`` and `` Wait`` (SentencePiece ``▁Wait``, byte-level ``ĠWait``) alike.
    Tokens that only contain a word (``Wait,``) or spell it in pieces are left alone."""
    targets = {w.strip() for w in words if w.strip()}
    if not targets:
        return []
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if text.strip() in targets]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", arXiv 2107.03374, §2.1): 1 − C(n−c, k)/C(n, k), in the
    paper's numerically stable product form. With n = k it is 1 iff any sample is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def question_seed(seed: int, ids: Sequence[str]) -> int:
    """Sampling seed of one batch: a hash of the eval seed and the batch's question ids, so a
    batch draws the same samples whatever ran before it (and on whichever rank it lands)."""
    digest = hashlib.sha256(json.dumps([int(seed), [str(i) for i in ids]]).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)  # fits every engine's seed type


def score_rows(records: Sequence[dict], responses: Sequence[Sequence[str]], checker: Callable,
               pattern=None, lengths: Sequence[int] | None = None,
               truncated: Sequence[bool] | None = None) -> list[dict]:
    """One row per sample, question-major (``k`` rows per record, sample index 0…k−1).

    ``records`` carry ``id``, ``subject``, ``answer``, ``options`` (list or None) and optionally
    ``question``; ``checker`` is a reward callable (:class:`r1v3.rewards.R1V3Reward`'s contract:
    items → dicts with ``accuracy``, ``format``, ``extracted``). ``lengths`` (tokens) and
    ``truncated`` are flat over the samples; without them ``tokens`` is None and nothing is
    truncated.
    """
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} response lists")
    ks = {len(r) for r in responses}
    if len(ks) > 1 or 0 in ks:
        raise ValueError(f"every question needs the same number k >= 1 of responses, got {sorted(ks)}")
    pattern = pattern if pattern is not None else claim_pattern(DEFAULT_PHRASES)
    items = [{"question": rec.get("question") or "", "answer": rec["answer"], "options": rec.get("options"),
              "response": text} for rec, texts in zip(records, responses) for text in texts]
    scores = checker(items)
    rows, n = [], 0
    for rec, texts in zip(records, responses):
        for j, text in enumerate(texts):
            s = scores[n]
            rows.append({
                "id": str(rec["id"]), "subject": rec.get("subject") or UNKNOWN_SUBJECT, "sample": j,
                "response": text, "extracted": s.get("extracted"), "reference": str(rec["answer"]),
                "correct": bool(s.get("accuracy", 0)), "well_formed": bool(s.get("format", 0)),
                "truncated": bool(truncated[n]) if truncated is not None else False,
                "blind_claim": has_blind_claim(text, pattern),
                "tokens": int(lengths[n]) if lengths is not None else None,
                "timed_out": bool(s.get("timed_out", False)),
            })
            n += 1
    return rows


def _mean() -> MeanMetric:
    # float64: the file reports exact fractions (1/3, not 0.3333333358) and large counts add up exactly.
    return MeanMetric().set_dtype(torch.float64)


class EvalMetrics(torch.nn.Module):
    """Streaming metrics over scored rows; torchmetrics states, so ``compute`` reduces over ranks.

    Keys of :meth:`compute`: ``accuracy`` (mean over all samples), ``accuracy_std`` (sample std of
    the k per-sample-index accuracies: the spread across the k sample sets; 0 for k = 1),
    ``pass_at_k``, ``format_rate``, ``response_tokens``, ``truncation_rate``, ``blind_claim_rate``,
    ``accuracy_blind_claim`` / ``accuracy_no_claim`` (absent when that side is empty, as in
    :func:`r1v3.callbacks.hallucination.blind_claim_stats`), ``accuracy/<subject>``, and the list
    ``accuracy_by_sample``.
    """

    SCALARS = ("accuracy", "pass_at_k", "format_rate", "response_tokens", "truncation_rate",
               "blind_claim_rate", "accuracy_blind_claim", "accuracy_no_claim")

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise EvalConfigError(f"k (samples per question) must be >= 1, got {k}")
        self.k = k
        self.scalars = torch.nn.ModuleDict({name: _mean() for name in self.SCALARS})
        self.by_sample = torch.nn.ModuleList([_mean() for _ in range(k)])
        # Subject names are free text (dots, spaces), which ModuleDict keys may not hold.
        self.subjects: dict[str, MeanMetric] = {}

    def _subject(self, name: str) -> MeanMetric:
        if name not in self.subjects:
            self.subjects[name] = _mean().to(self.scalars["accuracy"].device)
        return self.subjects[name]

    def update(self, rows: Sequence[dict]) -> None:
        if len(rows) % self.k:
            raise ValueError(f"{len(rows)} rows is not a whole number of questions of k={self.k} samples")
        m = self.scalars
        for row in rows:
            correct = float(row["correct"])
            m["accuracy"].update(correct)
            self.by_sample[row["sample"]].update(correct)
            self._subject(row["subject"]).update(correct)
            m["format_rate"].update(float(row["well_formed"]))
            m["truncation_rate"].update(float(row["truncated"]))
            m["blind_claim_rate"].update(float(row["blind_claim"]))
            m["accuracy_blind_claim" if row["blind_claim"] else "accuracy_no_claim"].update(correct)
            if row.get("tokens") is not None:
                m["response_tokens"].update(float(row["tokens"]))
        for q in range(0, len(rows), self.k):
            c = sum(int(r["correct"]) for r in rows[q:q + self.k])
            m["pass_at_k"].update(pass_at_k(self.k, c, self.k))

    def compute(self, subjects: Sequence[str] | None = None) -> dict:
        """Every rank must pass the same ``subjects`` (the union over ranks): each compute is a
        collective, so all ranks must run the same ones in the same order."""
        with warnings.catch_warnings():
            # A rank (or a side of the claim split) without updates is expected; NaN marks it.
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
            out = {name: float(metric.compute()) for name, metric in self.scalars.items()}
            per_index = [float(metric.compute()) for metric in self.by_sample]
            names = sorted(self.subjects) if subjects is None else sorted(set(subjects))
            for name in names:
                out[f"accuracy/{name}"] = float(self._subject(name).compute())
        out = {key: value for key, value in out.items() if not math.isnan(value)}
        per_index = [v for v in per_index if not math.isnan(v)]
        out["accuracy_std"] = statistics.stdev(per_index) if len(per_index) > 1 else 0.0
        out["accuracy_by_sample"] = per_index
        return out

    def reset(self) -> None:
        for metric in [*self.scalars.values(), *self.by_sample]:
            metric.reset()
        self.subjects = {}


def score_samples(records: Sequence[dict], responses_per_question: Sequence[Sequence[str]],
                  checker: Callable | None = None, phrases: Sequence[str] = DEFAULT_PHRASES,
                  lengths: Sequence[int] | None = None, truncated: Sequence[bool] | None = None) -> dict:
    """Score k responses per record and summarise them as the stage does: ``{"metrics": …,
    "rows": …}``. Without a ``checker`` a rules + math-verify :class:`~r1v3.rewards.R1V3Reward`
    with one worker is started and closed here."""
    own = checker is None
    if own:
        from r1v3.rewards import R1V3Reward

        checker = R1V3Reward(acc_weight=1.0, format_weight=0.0, num_workers=1)
    try:
        rows = score_rows(records, responses_per_question, checker, claim_pattern(phrases), lengths, truncated)
    finally:
        if own:
            checker.close()
    metrics = EvalMetrics(len(responses_per_question[0]) if responses_per_question else 1)
    metrics.update(rows)
    return {"metrics": metrics.compute(), "rows": rows}


def subject_counts(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = out.setdefault(row["subject"], {"questions": 0, "samples": 0})
        entry["samples"] += 1
        entry["questions"] += row["sample"] == 0
    return dict(sorted(out.items()))


SAMPLE_FIELDS = ("id", "subject", "sample", "response", "extracted", "reference", "correct",
                 "well_formed", "truncated", "blind_claim", "tokens")


def write_results(out_dir: str | Path, metrics: dict, rows: Sequence[dict], settings: dict,
                  counts: dict) -> dict[str, Path]:
    """``results.json`` (metrics, per-subject accuracy and counts, settings, counts),
    ``results.csv`` (``metric,value,count``: one row per metric, then one per subject) and
    ``samples.jsonl`` (one line per sample)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_subject = subject_counts(rows)
    scalars = {k: v for k, v in metrics.items() if not k.startswith("accuracy/") and k != "accuracy_by_sample"}
    subjects = {name: {"accuracy": metrics.get(f"accuracy/{name}"), **c} for name, c in per_subject.items()}
    paths = {name: out_dir / name for name in ("results.json", "results.csv", "samples.jsonl")}
    result = {"metrics": scalars, "accuracy_by_sample": metrics.get("accuracy_by_sample", []),
              "subjects": subjects, "counts": counts, "settings": settings}
    paths["results.json"].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    samples, questions = len(rows), sum(r["sample"] == 0 for r in rows)
    claimed = sum(r["blind_claim"] for r in rows)
    count_of = {"pass_at_k": questions, "accuracy_std": settings.get("k"),
                "accuracy_blind_claim": claimed, "accuracy_no_claim": samples - claimed}
    with paths["results.csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric", "value", "count"])
        for name, value in sorted(scalars.items()):
            writer.writerow([name, value, count_of.get(name, samples)])
        for name, entry in subjects.items():
            writer.writerow([f"accuracy/{name}", entry["accuracy"], entry["samples"]])
    with paths["samples.jsonl"].open("w") as fh:
        for row in rows:
            fh.write(json.dumps({key: row.get(key) for key in SAMPLE_FIELDS}, ensure_ascii=False) + "\n")
    return paths
