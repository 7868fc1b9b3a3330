"""Prompts in the model's chat template, and the think-before-answer format.

One function renders training targets (:func:`render_target`) and one parses responses
(:func:`parse_response`), so the SFT targets, the format reward and evaluation never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

IMAGE_MARK = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# MMMU writes "<image 1>"; shards normalise to "<image>", but accept both on the way in.
_IMAGE_MARK_RE = re.compile(r"<image(?: \d+)?>")
_THINK_RE = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def count_image_marks(question: str) -> int:
    return len(_IMAGE_MARK_RE.findall(question))


def build_messages(question: str, n_images: int, system: str | None = None,
                   options: Sequence[str] | None = None) -> list[dict]:
    """Chat messages whose user turn interleaves ``{"type": "image"}`` parts where the question has
    ``<image>`` marks. Images the question does not mark are placed first."""
    text = question
    if options and not re.search(r"(^|\n)A\.\s", question):
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        text += "\n" + "\n".join(f"{letters[i]}. {opt}" for i, opt in enumerate(options))
    pieces = _IMAGE_MARK_RE.split(text)
    marked = len(pieces) - 1
    if marked > n_images:
        raise ValueError(f"question has {marked} image marks but the sample has {n_images} images")
    content: list[dict] = [{"type": "image"} for _ in range(n_images - marked)]
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip("\n")})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


def render_prompt(processor, question: str, n_images: int, system: str | None = None,
                  options: Sequence[str] | None = None) -> str:
    """The prompt text, ending with the assistant's generation header."""
    messages = build_messages(question, n_images, system=system, options=options)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_target(trace: str, answer: str, eos: str = "") -> str:
    """The assistant turn the SFT stage learns: ``<think>trace</think> … \\boxed{answer}.``"""
    return f"{THINK_OPEN}{trace.strip()}{THINK_CLOSE} The answer is \\boxed{{{answer}}}.{eos}"


@dataclass(frozen=True)
class ParsedResponse:
    think: str | None
    answer_text: str
    boxed: str | None

    @property
    def well_formed(self) -> bool:
        """Exactly one ``<think>…</think>`` pair, then a non-empty answer with no think tag in it:
        the paper's format condition. ``<think>a</think>b</think>c`` is not well formed."""
        return (self.think is not None and bool(self.answer_text.strip())
                and THINK_OPEN not in self.answer_text and THINK_CLOSE not in self.answer_text)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}``, with nested braces balanced; None if absent or
    unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def parse_response(text: str) -> ParsedResponse:
    match = _THINK_RE.match(text)
    if match and THINK_OPEN not in match.group("think"):
        think, answer = match.group("think"), match.group("answer")
    else:
        think, answer = None, text
    return ParsedResponse(think=think, answer_text=answer.strip(), boxed=last_boxed(answer))
