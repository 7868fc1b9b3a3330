"""``r1v3 shards`` and ``r1v3 synth``: write tar shards from records on disk or from the synthetic task.

Both keep the CLI contract of one error line (exit 2) for a bad argument or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1v3.data_modules.shards import CONVERTERS, write_shards
from r1v3.data_modules.synthetic import DEFAULT_OOD_TASKS, DEFAULT_TRAIN_TASKS, REFLECT_FRAC, TASKS, write_synthetic


class UsageError(Exception):
    pass


class CliParser(argparse.ArgumentParser):
    """argparse would print the whole usage block and exit; the CLI contract is one error line."""

    def error(self, message: str):
        raise UsageError(message)


def shards_main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="r1v3 shards", description="Convert JSONL records plus images to tar shards.")
    parser.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("--input", required=True, help="records, one JSON object per line")
    parser.add_argument("--image-root", required=True, help="folder that relative image paths start from")
    parser.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"r1v3 shards: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    problem = None
    if not Path(args.input).is_file():
        problem = f"input file not found: {args.input}"
    elif not Path(args.image_root).is_dir():
        problem = f"image root is not a directory: {args.image_root}"
    elif args.maxcount < 1:
        problem = f"--maxcount must be >= 1, got {args.maxcount}"
    if problem is None:
        try:
            stats = write_shards(CONVERTERS[args.format](args.input, args.image_root), args.out, args.maxcount)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            problem = str(exc)
    if problem is not None:
        print(f"r1v3 shards: error: {problem}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.format, **stats}))
    return 0



def _names(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise UsageError(f"unknown task(s) {', '.join(bad) or text!r}; known: {', '.join(TASKS)}")
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"difficulties must be integers >= 1, got {text!r}")
    return values


def synth_main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="r1v3 synth", description="Render the synthetic visual-math task to tar shards.")
    p.add_argument("--out", required=True, help="output folder; train/, val/, ood/ go below it")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-ood", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(DEFAULT_TRAIN_TASKS), help=f"train tasks, from {', '.join(TASKS)}")
    p.add_argument("--ood-tasks", default=",".join(DEFAULT_OOD_TASKS))
    p.add_argument("--difficulty", default="1", help="comma-separated levels, e.g. 1,2")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--maxcount", type=int, default=1000)
    p.add_argument("--reflect-frac", type=float, default=REFLECT_FRAC,
                   help="fraction of traces with a reflection word (Wait, Hmm, But, ...)")
    try:
        args = p.parse_args(argv)
        train, ood, levels = _names(args.tasks), _names(args.ood_tasks), _ints(args.difficulty)
        for ok, what in ((min(args.n_train, args.n_val, args.n_ood) >= 0, "sample counts must be >= 0"),
                         (32 <= args.size <= 1024, "--size must be between 32 and 1024"),
                         (args.maxcount >= 1, "--maxcount must be >= 1"),
                         (0.0 <= args.reflect_frac <= 1.0, "--reflect-frac must be in [0, 1]")):
            if not ok:
                raise UsageError(what)
    except UsageError as exc:
        print(f"r1v3 synth: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        stats = write_synthetic(args.out, args.n_train, args.n_val, args.n_ood, args.seed, train, ood,
                                levels, args.size, args.maxcount, args.reflect_frac)
    except OSError as exc:
        print(f"r1v3 synth: error: {exc}", file=sys.stderr)
        return 2
    summary = {"out": str(args.out), **{k: {"written": v["written"], "skipped": v["skipped"],
                                            "shards": len(v["shards"])} for k, v in stats.items()}}
    print(json.dumps(summary))
    return 0
