"""Step rewards as the dense per-token rewards RL trainers (verl, OpenRLHF) consume, for the policy's tokenizer.

The server never needs the policy's tokenizer: it returns each step's character span in the
completion (`ScoreResult.step_spans`), and this helper, running in the trainer, maps the spans onto
the policy's tokens of that completion.
"""

from __future__ import annotations

from typing import Any

from prmserve.errors import InvalidInputError
from prmserve.results import ScoreResult

MODES = ("last", "all")


def token_rewards(result: ScoreResult, tokenizer: Any, completion: str, mode: str = "last") -> list[float]:
    """One reward per token of `tokenizer(completion)` (no special tokens added).

    mode="last": a step's reward at the token holding its last non-space character, 0 elsewhere
    (a token that ends two steps gets the later one's); mode="all": every token overlapping a step
    gets that step's reward (the later step's where one token spans two), separators' tokens 0.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if result.step_spans is None:
        raise InvalidInputError("token_rewards needs step spans: score a {problem, completion} or {messages} item")
    if len(result.step_spans) != len(result.step_rewards):
        raise InvalidInputError(f"{len(result.step_spans)} step spans for {len(result.step_rewards)} rewards")
    offsets = _offsets(tokenizer, completion)
    rewards = [0.0] * len(offsets)
    for (start, end), reward in zip(result.step_spans, result.step_rewards):
        if not 0 <= start < end <= len(completion):
            raise InvalidInputError(f"step span [{start}, {end}) lies outside the completion of {len(completion)} characters")
        last = start + len(completion[start:end].rstrip()) - 1
        for index, (token_start, token_end) in enumerate(offsets):
            if mode == "all" and token_start < end and token_end > start:
                rewards[index] = reward
            elif mode == "last" and token_start <= last < token_end:
                rewards[index] = reward
    return rewards


def _offsets(tokenizer: Any, completion: str) -> list[tuple[int, int]]:
    """Character [start, end) of each token of the completion; needs a fast (Rust) tokenizer."""
    try:
        encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise InvalidInputError("token_rewards needs a fast tokenizer (offset mapping); load it with use_fast=True") from None
    return [tuple(span) for span in encoded["offset_mapping"]]
