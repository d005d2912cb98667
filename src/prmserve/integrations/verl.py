"""verl's `custom_reward_function`, scored by a prmserve server.

In verl's config: `custom_reward_function.path=<site-packages>/prmserve/integrations/verl.py`,
`custom_reward_function.name=compute_score`, and `PRMSERVE_URL=http://host:8000` (optionally
`PRMSERVE_API_KEY`, `PRMSERVE_AGGREGATE`) in the workers' environment. verl's reward loop calls it
once per sample, concurrently; the server batches those calls. The problem is the dataset's
`extra_info["question"]` (verl's GSM8K and MATH preprocessing put it there), else `"problem"`, else
the user turn of `extra_info["prompt"]` when it is rendered chat text.
"""

from __future__ import annotations

import os
from typing import Any

from prmserve.errors import InvalidInputError

_clients: dict[tuple[str, str | None], Any] = {}


async def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any) -> float:
    """The PRM's aggregate reward of `solution_str` (split into steps on blank lines) for the sample's problem."""
    from prmserve.client import AsyncClient

    url = os.environ.get("PRMSERVE_URL")
    if not url:
        raise InvalidInputError("set PRMSERVE_URL to the prmserve server (e.g. http://127.0.0.1:8000) for compute_score")
    key = (url, os.environ.get("PRMSERVE_API_KEY"))
    if key not in _clients:
        _clients[key] = AsyncClient(url, api_key=key[1])
    result = (await _clients[key].score([{"problem": problem_of_sample(extra_info), "completion": solution_str}]))[0]
    return result.aggregate(os.environ.get("PRMSERVE_AGGREGATE", "min"))


def problem_of_sample(extra_info: dict | None) -> str:
    """The sample's problem text, from the fields verl's datasets carry."""
    info = extra_info or {}
    for field in ("question", "problem"):
        if isinstance(info.get(field), str) and info[field].strip():
            return info[field]
    if isinstance(info.get("prompt"), str):
        from prmserve.integrations.chat_text import problem_of

        return problem_of(info["prompt"])
    raise InvalidInputError("compute_score needs the problem: put it in extra_info['question'] (verl's math preprocessing does)")
