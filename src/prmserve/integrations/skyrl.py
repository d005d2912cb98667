"""A reward engine for RL trainers that hold token ids (SkyRL's `score(input_ids, output_ids)` shape),
with the per-request priority their reward path lacks.

The ids are the policy's: they are decoded with the policy's tokenizer, the problem is read from the
prompt's chat format, and the response is scored as a completion by a prmserve server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prmserve.errors import InvalidInputError
from prmserve.integrations.chat_text import problem_of


class RewardEngine:
    """`score(input_ids, output_ids, priority=0) -> [reward]`: one aggregate (default min) per sample."""

    def __init__(self, url: str, policy_tokenizer: Any, aggregate: str = "min", **client_options: Any) -> None:
        from prmserve.client import Client

        self.client = Client(url, **client_options)
        self.tokenizer = policy_tokenizer
        self.aggregate = aggregate

    def score(self, input_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]], priority: int = 0) -> list[float]:
        """Rewards of each (prompt ids, response ids) pair, scored together (shared prefixes computed once)."""
        if len(input_ids) != len(output_ids):
            raise InvalidInputError(f"{len(input_ids)} prompts but {len(output_ids)} responses")
        items = []
        for index, (prompt, response) in enumerate(zip(input_ids, output_ids)):
            try:
                problem = problem_of(self.tokenizer.decode(list(prompt), skip_special_tokens=False))
            except InvalidInputError as exc:
                raise InvalidInputError(f"sample {index}: {exc}") from None
            items.append({"problem": problem, "completion": self.tokenizer.decode(list(response), skip_special_tokens=True)})
        return [r.aggregate(self.aggregate) for r in self.client.score(items, priority=priority)]

    def close(self) -> None:
        self.client.close()
