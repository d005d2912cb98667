"""How a step's prompt is laid out: the problem part, then each step so far and the separator after it."""

from __future__ import annotations

from collections.abc import Sequence

STEP_SEPARATOR = "\n\n"  # the generator stops here; a step never holds it
DEFAULT_PROMPT_TEMPLATE = "Problem: {problem}\n\nSolution:\n\n"


def check_template(template: str) -> str:
    """The template, or ValueError when it has no place for the problem."""
    if "{problem}" not in template:
        raise ValueError("the prompt template must contain '{problem}', where the problem text goes")
    return template


def step_prompt(template: str, problem: str, steps: Sequence[str]) -> str:
    """The text the next step continues: `{problem}` replaced (no other braces are read: LaTeX stays), then the steps."""
    return template.replace("{problem}", problem) + "".join(step + STEP_SEPARATOR for step in steps)
