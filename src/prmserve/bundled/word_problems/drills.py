"""Arithmetic drills, for training only: a problem's computations as bare claims, some slipped or wrongly carried.

``"120 coins. 120 - 45 = 75 coins. 75 × 3 = 225 coins."`` holds as many arithmetic checks as a worded solution
in a fraction of its tokens, so drills teach the bundled PRM the checks that need arithmetic, not wording.
"""

from __future__ import annotations

import random

from prmserve.bundled.word_problems import numbers
from prmserve.bundled.word_problems.problems import make_problem
from prmserve.bundled.word_problems.solutions import Plan, PlannedStep, plan_solution, write_solution


def drill_plan(rng: random.Random, scale: int = numbers.MAX_GIVEN) -> Plan:
    """A training problem's solution planned as bare claims after its start, given numbers at most ``scale``."""
    plan = plan_solution(rng, make_problem(rng, scale=scale))
    plan.steps = [PlannedStep("start", "{v} {item}.")] + [
        PlannedStep("claim", rng.choice(["{calc} {item}.", "{calc}."]), s.op_index, s.part)
        for s in plan.steps if s.role == "claim"
    ]
    return plan


def write_drill(plan: Plan, rng: random.Random, error_kind: str = "", error_step: int = -1) -> tuple[str, int] | None:
    """The drill's text and the character where it departs from the correct drill (-1 if it is correct);
    None if the error can't fit."""
    solution = write_solution(plan, rng, error_kind, error_step)
    if solution is None:
        return None
    text = " ".join(solution.steps)
    if solution.first_error < 0:
        return text, -1
    return text, sum(len(s) + 1 for s in solution.steps[: solution.first_error]) + solution.error_offset


def make_drill(rng: random.Random, p_error: float = 0.5, p_slip: float = 0.6,
               scale: int = numbers.MAX_GIVEN) -> tuple[str, int]:
    """A drill (given numbers at most ``scale``); with probability ``p_error`` one claim has a slip (``p_slip``
    of those) or a wrong carried value. Returns the text and where it departs from the correct drill (or -1)."""
    while True:
        plan = drill_plan(rng, scale)
        if rng.random() >= p_error:
            return write_drill(plan, rng)
        kind = "slip" if rng.random() < p_slip else "wrong_carry"
        made = write_drill(plan, rng, kind, rng.randrange(1, len(plan.steps)))
        if made is not None:
            return made
