"""Completions and chats as search and RL frameworks hold them, turned into (problem, steps) items.

A completion is split into steps by a rule (a literal separator, "\\n\\n" by default as search-and-learn
and most PRM cards split, or a regex); empty pieces are dropped, and each step's [start, end)
character span in the completion as sent is kept, so callers can map rewards back to their tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from prmserve.errors import InvalidInputError

DEFAULT_STEP_SPLIT = "\n\n"
SplitRule = str | re.Pattern | Mapping[str, str]


def split_rule(rule: Any) -> str | re.Pattern:
    """A literal separator, or a compiled regex from a pattern or `{"regex": pattern}` (the JSON form)."""
    if isinstance(rule, re.Pattern):
        return rule
    if isinstance(rule, Mapping) and set(rule) == {"regex"} and isinstance(rule["regex"], str):
        try:
            return re.compile(rule["regex"])
        except re.error as exc:
            raise InvalidInputError(f"'step_split' regex {rule['regex']!r} does not compile: {exc}") from None
    if isinstance(rule, str) and rule:
        return rule
    raise InvalidInputError("'step_split' must be a non-empty separator string or {\"regex\": pattern}")


def split_completion(completion: Any, rule: str | re.Pattern) -> tuple[list[str], list[tuple[int, int]]]:
    """The completion's non-empty steps and their [start, end) spans in it."""
    if not isinstance(completion, str) or not completion.strip():
        raise InvalidInputError("'completion' must be a non-empty string")
    steps, spans, start = [], [], 0
    separators = (
        [(m.start(), m.end()) for m in rule.finditer(completion) if m.end() > m.start()]
        if isinstance(rule, re.Pattern)
        else _literal_matches(completion, rule)
    )
    for sep_start, sep_end in [*separators, (len(completion), len(completion))]:
        piece = completion[start:sep_start]
        if piece.strip():
            steps.append(piece)
            spans.append((start, sep_start))
        start = sep_end
    return steps, spans


def _literal_matches(text: str, separator: str) -> list[tuple[int, int]]:
    out, at = [], text.find(separator)
    while at != -1:
        out.append((at, at + len(separator)))
        at = text.find(separator, at + len(separator))
    return out


def chat_to_completion(messages: Any) -> tuple[str, str]:
    """(problem, completion) of a chat whose last turn is the assistant's answer to the last user turn."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("'messages' must be a non-empty list of {role, content} turns")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidInputError(f"messages[{i}] must be a {{role, content}} object")
        turns.append((message["role"], _content(message.get("content"), i)))
    if turns[-1][0] != "assistant":
        raise InvalidInputError("the last message must be the assistant's answer to score")
    users = [content for role, content in turns[:-1] if role == "user"]
    if not users:
        raise InvalidInputError("'messages' needs a user turn (the problem) before the assistant's answer")
    return users[-1], turns[-1][1]


def _content(content: Any, index: int) -> str:
    """A message's text: a string or a list of {"type": "text", "text"} parts, joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise InvalidInputError(f"messages[{index}].content must be a string or a list of text parts")
