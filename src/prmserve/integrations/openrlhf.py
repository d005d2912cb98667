"""OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:8000/get_reward`).

OpenRLHF posts `{"query": [prompt + response as one rendered text], "prompts": [prompt], "labels": [...]}`
and reads `{"rewards": [...], "scores": [...], "extra_logs": {...}}`, one number per query. prmserve
reads the problem from the prompt's user turn and the response from the query after the prompt, splits
the response into steps, and reduces the step rewards with `aggregate` (`--rl-aggregate`, default min).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prmserve.errors import InvalidInputError
from prmserve.integrations.chat_text import split_chat_text


def items_from_queries(queries: Sequence[str], prompts: Sequence[str] | None) -> list[dict[str, Any]]:
    """One {problem, completion} item per query, naming the query that could not be read."""
    if prompts is not None and len(prompts) != len(queries):
        raise InvalidInputError(f"{len(queries)} queries but {len(prompts)} prompts")
    items = []
    for index, query in enumerate(queries):
        try:
            problem, response = split_chat_text(query, prompts[index] if prompts is not None else None)
        except InvalidInputError as exc:
            raise InvalidInputError(f"query {index}: {exc}") from None
        items.append({"problem": problem, "completion": response})
    return items


def reward_body(rewards: list[float], step_counts: list[int]) -> dict[str, Any]:
    """OpenRLHF's answer: rewards and scores alike, and the step counts as an extra log."""
    return {"rewards": rewards, "scores": rewards, "extra_logs": {"prm_num_steps": step_counts}}
