"""The format reward of Skywork-R1V3 (arXiv 2507.06167, §3.2): 1 iff the response is exactly one
``<think>…</think>`` pair followed by a non-empty answer (no further think tag).

It delegates to :func:`r1v3.chat.parse_response`, the same parser the SFT targets and evaluation
use, so "well formed" means one thing everywhere.
"""

from __future__ import annotations

from r1v3.chat import parse_response


def format_reward(response: str) -> float:
    return 1.0 if parse_response(response).well_formed else 0.0
