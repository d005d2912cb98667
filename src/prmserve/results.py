"""What scoring returns, offline or over HTTP: step rewards, their aggregate, token usage. No torch here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

AGGREGATIONS = ("min", "last", "mean", "prod")


@dataclass(frozen=True)
class TokenUsage:
    """prompt_tokens = computed_tokens + cached_tokens + the tokens after the last step's read position, which are
    never computed (in a causal model no reward depends on them; Qwen2.5-Math-PRM's `<|im_end|>` and newline)."""

    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: "TokenUsage") -> "TokenUsage":
        return TokenUsage(
            self.prompt_tokens + other.prompt_tokens,
            self.computed_tokens + other.computed_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True)
class ScoreResult:
    """One item's step rewards, in step order (an outcome model gives one, for the whole solution).

    `handle` names the scored node when it was kept (`keep=True`), for `extend` and `release`;
    `step_spans` are a completion's steps as [start, end) characters of it (completion and chat items).
    """

    step_rewards: list[float]
    usage: TokenUsage = field(default_factory=TokenUsage)
    handle: str | None = None
    step_spans: list[tuple[int, int]] | None = None

    def aggregate(self, method: str = "min") -> float:
        """One number for the solution: min, last, mean or prod of the step rewards."""
        return aggregate(self.step_rewards, method)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(rewards: list[float], method: str) -> float:
    """Reduce step rewards to one solution score."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not rewards:
        raise ValueError("no step rewards to aggregate")
    if method == "min":
        return min(rewards)
    if method == "last":
        return rewards[-1]
    if method == "mean":
        return sum(rewards) / len(rewards)
    return math.prod(rewards)
