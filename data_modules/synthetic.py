"""Synthetic visual-math task: small PIL renderings with rule-checkable answers and think-style traces.

Every sample is a pure function of (task, seed, index, difficulty, size), so splits are reproducible
without storing anything. Colours are exact RGB fills without anti-aliasing, which keeps rendering fast
and lets tests recover the drawn content from pixels.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, ImageDraw

from .shards import write_shards

PALETTE = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (30, 150, 60), "orange": (245, 140, 20),
           "purple": (140, 60, 190)}
# Fixed options at difficulty 1 make the colour task a constant colour->letter map (CI smoke test).
EASY_COLOURS = ("red", "blue", "green", "orange")
LIGHT_BACKGROUNDS = ((255, 255, 255), (248, 246, 238), (240, 244, 250), (242, 248, 240))
INK = (20, 20, 20)
GREY = (128, 128, 128)
LETTERS = "ABCDEFGH"
REFLECT_FRAC = 0.5

# Seven-segment layout: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle.
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}


def render_target(trace: str, answer: str) -> str:
    return f"<think>{trace}</think> The answer is \\boxed{{{answer}}}."


def _canvas(rng: random.Random, difficulty: int, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    bg = LIGHT_BACKGROUNDS[0] if difficulty <= 1 else rng.choice(LIGHT_BACKGROUNDS)
    img = Image.new("RGB", (size, size), bg)
    return img, ImageDraw.Draw(img)


def _mc_question(stem: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"<image>\n{stem}\n{lines}"


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _reflects(rng: random.Random, frac: float) -> bool:
    # Always draw, so the image stream does not depend on the reflection fraction.
    return rng.random() < frac


def _result(subject: str, img: Image.Image, question: str, answer: str, options, parts: list[str]) -> dict:
    return {"images": [img], "question": question, "answer": answer, "options": options,
            "trace": " ".join(parts), "subject": subject}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- tasks

_GRID = 4
_ROW_NAMES = ("top", "middle", "middle", "bottom")
_COL_NAMES = ("left", "middle", "middle", "right")


def _where(cell: int) -> str:
    row, col = _ROW_NAMES[cell // _GRID], _COL_NAMES[cell % _GRID]
    return "the middle" if row == col else f"the {row} {col}"


def task_count(rng: random.Random, difficulty: int, size: int, reflect: float = REFLECT_FRAC) -> dict:
    img, draw = _canvas(rng, difficulty, size)
    target = rng.choice(list(PALETTE))
    others = [c for c in PALETTE if c != target]
    if difficulty <= 1:
        n, n_distract = rng.randint(1, 4), 0
    else:
        n, n_distract = rng.randint(1, 6), rng.randint(1, 3 if difficulty == 2 else 6)
    # One shape per grid cell with a 2 px margin guarantees separated, countable blobs.
    cells = rng.sample(range(_GRID * _GRID), n + n_distract)
    cell = size // _GRID
    hi = cell - 4
    lo = min(hi, max(8, cell * 9 // 16))
    distractor_colours = set()
    for i, c in enumerate(cells):
        colour = target if i < n else rng.choice(others)
        if i >= n:
            distractor_colours.add(colour)
        s = rng.randint(lo, hi)
        x = (c % _GRID) * cell + 2 + rng.randint(0, hi - s)
        y = (c // _GRID) * cell + 2 + rng.randint(0, hi - s)
        _draw_shape(draw, rng.choice(("circle", "square")), (x, y, x + s - 1, y + s - 1), PALETTE[colour])

    targets = sorted(cells[:n])
    # Two positions read naturally; beyond that the two middle columns make place names ambiguous.
    if n <= 2:
        seen = "I see " + ", ".join(f"one at {_where(c)}" for c in targets) + "."
    else:
        rows = [sum(1 for c in targets if c // _GRID == r) for r in range(_GRID)]
        seen = "Row by row I count " + ", ".join(map(str, rows)) + "."
    parts = [f"I look for {target} shapes.", seen]
    if _reflects(rng, reflect):
        if distractor_colours and rng.random() < 0.5:
            parts.append(f"But the {sorted(distractor_colours)[0]} ones do not count.")
        else:
            parts.append(rng.choice(("Wait, let me recount. Yes.", f"Hmm, let me check again. Still {n}.")))
    parts.append(f"There {'is' if n == 1 else 'are'} {_plural(n, target + ' shape')}.")
    return _result("count", img, f"<image>\nHow many {target} shapes are there?", str(n), None, parts)


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int, h: int, t: int, colour) -> None:
    """Seven-segment digit in the box (x, y, w, h) with stroke t; segments overlap at the corners."""
    mid = y + h // 2
    right, bottom, g0 = x + w - 1, y + h - 1, mid - t // 2
    boxes = {"a": (x, y, right, y + t - 1), "g": (x, g0, right, g0 + t - 1), "d": (x, bottom - t + 1, right, bottom),
             "f": (x, y, x + t - 1, mid), "b": (right - t + 1, y, right, mid),
             "e": (x, mid, x + t - 1, bottom), "c": (right - t + 1, mid, right, bottom)}
    for seg in SEGMENTS[digit]:
        draw.rectangle(boxes[seg], fill=colour)


def task_add_digits(rng: random.Random, difficulty: int, size: int, reflect: float = REFLECT_FRAC) -> dict:
    img, draw = _canvas(rng, difficulty, size)
    top = 4 if difficulty <= 1 else 9
    a, b = rng.randint(0, top), rng.randint(0, top)
    w, h, t = size * 5 // 16, size // 2, max(2, size // 16)
    half = size // 2
    if difficulty <= 1:
        xs, ys, colours = (half // 2 - w // 2, half + half // 2 - w // 2), (size // 4,) * 2, (INK, INK)
    else:
        # Each digit stays inside its own half, so left/right reading is unambiguous.
        xs = (rng.randint(2, half - w - 2), rng.randint(half + 2, size - w - 2))
        ys = (rng.randint(2, size - h - 2), rng.randint(2, size - h - 2))
        dark = [INK] + [PALETTE[c] for c in ("red", "blue", "green", "purple")]
        colours = (rng.choice(dark), rng.choice(dark))
    for d, x, y, col in zip((a, b), xs, ys, colours):
        draw_digit(draw, d, x, y, w, h, t, col)

    parts = [f"The left digit is {a} and the right digit is {b}.", f"{a} + {b} = {a + b}."]
    if _reflects(rng, reflect):
        parts.append(rng.choice((f"Wait, let me check: {a + b} - {b} = {a}. Yes.",
                                 f"Hmm, adding the other way, {b} + {a} = {a + b} too.")))
    return _result("add_digits", img, "<image>\nWhat is the sum of the two digits?", str(a + b), None, parts)


def _level(h: int, top: int) -> str:
    frac = h / top
    return "near the top" if frac > 0.75 else "about halfway" if frac > 0.45 else "low"


def task_compare_bars(rng: random.Random, difficulty: int, size: int, reflect: float = REFLECT_FRAC) -> dict:
    img, draw = _canvas(rng, difficulty, size)
    base = size - size // 8  # last bar row; the grey baseline sits just below it
    top = base - size // 8
    lo_h = size // 8
    if difficulty <= 1:
        gap = rng.randint(max(2, top * 35 // 100), top * 3 // 4)
    elif difficulty == 2:
        gap = rng.randint(max(2, top // 8), max(3, top // 4))
    else:
        gap = rng.randint(2, max(2, top // 12))
    short = rng.randint(lo_h, max(lo_h, top - gap))
    heights = [short, short + gap]
    rng.shuffle(heights)
    bw = size * 7 // 32
    colours = [PALETTE["blue"]] * 2 if difficulty <= 1 else [PALETTE[rng.choice(list(PALETTE))] for _ in range(2)]
    draw.line((2, base + 1, size - 3, base + 1), fill=GREY)
    for centre, hgt, col in zip((size * 3 // 10, size * 7 // 10), heights, colours):
        draw.rectangle((centre - bw // 2, base - hgt + 1, centre - bw // 2 + bw - 1, base), fill=col)

    ask = "taller" if difficulty <= 1 or rng.random() < 0.5 else "shorter"
    taller = 0 if heights[0] > heights[1] else 1
    pick = taller if ask == "taller" else 1 - taller
    side = ("left", "right")
    levels = [_level(h, top) for h in heights]
    if levels[0] != levels[1]:
        seen = f"The left bar is {levels[0]} and the right bar is {levels[1]}."
    else:
        seen = f"The bars are close, but the {side[taller]} one ends a little higher."
    parts = [seen]
    if _reflects(rng, reflect):
        parts.append(rng.choice(("Hmm, let me compare the tops again.",
                                 f"Wait, the question asks for the {ask} one.")))
    parts.append(f"So the {side[pick]} bar is {ask}: {LETTERS[pick]}.")
    return _result("compare_bars", img, _mc_question(f"Which bar is {ask}?", side), LETTERS[pick], list(side), parts)


def task_colour(rng: random.Random, difficulty: int, size: int, reflect: float = REFLECT_FRAC) -> dict:
    img, draw = _canvas(rng, difficulty, size)
    options = list(EASY_COLOURS) if difficulty <= 1 else rng.sample(list(PALETTE), 4)
    target = rng.choice(options)
    kind = rng.choice(("circle", "square", "triangle"))
    s = rng.randint(size * 45 // 100, size * 70 // 100)
    x, y = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
    _draw_shape(draw, kind, (x, y, x + s - 1, y + s - 1), PALETTE[target])
    letter = LETTERS[options.index(target)]
    parts = [f"I see one big {target} {kind}."]
    if _reflects(rng, reflect):
        parts.append(f"Hmm, let me look again. It is {target}.")
    parts.append(f"{target.capitalize()} is option {letter}.")
    return _result("colour", img, _mc_question("What colour is the shape?", options), letter, options, parts)


_DIRECTIONS = {12: "straight up", 3: "to the right", 6: "straight down", 9: "to the left"}


def task_clock(rng: random.Random, difficulty: int, size: int, reflect: float = REFLECT_FRAC) -> dict:
    img, draw = _canvas(rng, difficulty, size)
    # Difficulty 1 uses the four quarter hours; 8 directions would not land on whole hours, so harder
    # levels use all 12.
    hours = (12, 3, 6, 9) if difficulty <= 1 else tuple(range(1, 13))
    hour = rng.choice(hours)
    c = size // 2
    r = size * 42 // 100
    draw.ellipse((c - r, c - r, c + r, c + r), outline=GREY, width=max(1, size // 32))

    def at(h: int, dist: float) -> tuple[float, float]:
        return c + dist * r * math.sin(math.radians(h * 30)), c - dist * r * math.cos(math.radians(h * 30))

    for tick in hours:
        draw.line((at(tick, 0.8), at(tick, 0.95)), fill=GREY, width=max(1, size // 32))
    tip = tuple(round(v) for v in at(hour, 0.7))
    draw.line(((c, c), tip), fill=INK, width=max(2, size // 20))
    dot = max(2, size // 24)
    draw.ellipse((c - dot, c - dot, c + dot, c + dot), fill=INK)

    if hour in _DIRECTIONS:
        parts = [f"The hand points {_DIRECTIONS[hour]}.", f"On a clock that is {hour}."]
    else:
        parts = [f"The hand points {_plural(hour, 'step')} clockwise from the top.", f"So it is at {hour}."]
    if _reflects(rng, reflect):
        parts.append(rng.choice(("Hmm, let me check the direction again. Yes.",
                                 "Wait, the hour goes clockwise from 12. Yes.")))
    question = "<image>\nThe clock has one hand. Which hour does it point to?"
    return _result("clock", img, question, str(hour), None, parts)


TASKS: dict[str, Callable[..., dict]] = {"count": task_count, "add_digits": task_add_digits,
                                         "compare_bars": task_compare_bars, "colour": task_colour,
                                         "clock": task_clock}
DEFAULT_TRAIN_TASKS = ("count", "add_digits", "compare_bars", "colour")
DEFAULT_OOD_TASKS = ("clock",)


# --------------------------------------------------------------------------- sampling


def make_sample(task: str, seed: int, index: int, difficulty: int = 1, size: int = 64,
                reflect: float = REFLECT_FRAC) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if difficulty < 1 or size < 32:
        raise ValueError(f"need difficulty >= 1 and size >= 32, got {difficulty} and {size}")
    # String seeding hashes with SHA-512, so it is stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"r1v3-synth|{task}|{seed}|{index}|{difficulty}|{size}")
    sample = TASKS[task](rng, difficulty, size, reflect)
    sample.update(id=f"{task}_{seed}_{index}_d{difficulty}", difficulty=difficulty,
                  source="synthetic", subject=task)
    return sample


def _stream(tasks: Sequence[str], seed: int, difficulties: Sequence[int], size: int,
            reflect: float) -> Iterator[dict]:
    if not tasks or not difficulties:
        raise ValueError("need at least one task and one difficulty")
    # Round-robin over tasks, then difficulties, keeps every mix exactly balanced.
    for i in itertools.count():
        task = tasks[i % len(tasks)]
        difficulty = difficulties[(i // len(tasks)) % len(difficulties)]
        yield make_sample(task, seed, i, difficulty, size, reflect)


def generate(n: int, tasks: Sequence[str], seed: int, difficulties: Sequence[int] = (1,), size: int = 64,
             reflect: float = REFLECT_FRAC) -> Iterator[dict]:
    return itertools.islice(_stream(tuple(tasks), seed, tuple(difficulties), size, reflect), n)


def content_digest(sample: dict) -> bytes:
    h = hashlib.sha1(f"{sample['question']}\x00{sample['answer']}".encode())
    for im in sample["images"]:
        h.update(im.tobytes())
    return h.digest()


def _split_seed(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:4], "big")


def _unseen(stream: Iterator[dict], n: int, seen: set[bytes], record: bool) -> Iterator[dict]:
    """n samples whose content is not in ``seen``; gives up after 20n tries on tiny task spaces."""
    kept = 0
    for sample in itertools.islice(stream, 20 * n + 100):
        if kept >= n:
            return
        digest = content_digest(sample)
        if digest in seen:
            continue
        if record:
            seen.add(digest)
        kept += 1
        yield sample


def write_synthetic(out_dir, n_train: int = 2000, n_val: int = 200, n_ood: int = 200, seed: int = 0,
                    train_tasks: Sequence[str] = DEFAULT_TRAIN_TASKS,
                    ood_tasks: Sequence[str] = DEFAULT_OOD_TASKS, difficulties: Sequence[int] = (1,),
                    size: int = 64, maxcount: int = 1000, reflect: float = REFLECT_FRAC) -> dict:
    """Write train/val/ood shards; val and ood never repeat a train image+question exactly."""
    out = Path(out_dir)
    seen: set[bytes] = set()
    result = {}
    for split, n, tasks in (("train", n_train, train_tasks), ("val", n_val, train_tasks),
                            ("ood", n_ood, ood_tasks)):
        stream = _stream(tuple(tasks), _split_seed(seed, split), tuple(difficulties), size, reflect)
        # Only train digests are recorded, so val and ood are filtered against train alone.
        samples = _unseen(stream, n, seen, record=split == "train")
        result[split] = write_shards(samples, str(out / split / "synth-%06d.tar"), maxcount)
    return result


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """n texts (question plus rendered target) over every task and difficulty, for tokenizer training."""
    stream = _stream(tuple(TASKS), _split_seed(seed, "corpus"), (1, 2, 3), 64, REFLECT_FRAC)
    return [f"{s['question']}\n{render_target(s['trace'], s['answer'])}" for s in itertools.islice(stream, n)]


def answer_space_size(task: str, difficulty: int = 1) -> int:
    """How many answers an open question of ``task`` can have: the denominator of chance accuracy."""
    easy = difficulty <= 1
    sizes = {"count": 4 if easy else 6, "add_digits": 9 if easy else 19, "clock": 4 if easy else 12}
    if task not in sizes:
        raise ValueError(f"{task!r} is multiple choice or unknown; chance comes from its options")
    return sizes[task]
