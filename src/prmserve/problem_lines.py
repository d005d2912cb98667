"""A JSONL line holding a problem, as the demo, the search driver and the evaluations read them."""

from __future__ import annotations

import json
from typing import Any

from prmserve.errors import InvalidInputError


def parse_problem_line(text: str) -> dict[str, Any]:
    """The line's object, which must hold a non-empty 'problem' string; InvalidInputError saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"bad JSON: {exc}") from None
    if not isinstance(record, dict):
        raise InvalidInputError(f"a line must be a JSON object, not {type(record).__name__}")
    if not isinstance(record.get("problem"), str) or not record["problem"].strip():
        raise InvalidInputError("'problem' must be a non-empty string")
    return record
