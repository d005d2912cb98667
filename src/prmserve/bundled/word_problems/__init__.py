"""Synthetic arithmetic word problems with step-labelled solutions, for training and judging the bundled PRM.

A problem follows one person's quantity through 1-4 operations (+ − × ÷, halves and quarters), with given
numbers up to 1,000 and results up to 10,000. A solution has a step per computation, worded in many ways
(the computation written out, only its result, or a bare ``12 + 7 = 19``; ``×``, ``*``, ``x``, ``÷``, ``/``),
sometimes a step that restates a value, and a final answer (``The answer is 19.``, ``So 19.``,
``\\boxed{19}``, ``#### 19``...). A corrupted solution holds one error: a bad operation, a slipped result, a
wrong carried value, or a wrong final answer after correct steps; later steps compute correctly from the
wrong value, so (every operation being injective) a solution is correct iff its final answer is.

Splits: ``train`` and ``validation`` share templates and numbers; ``test`` is written only with held-out
templates, names and items (``phrasing``), and every test problem has given numbers from bands that
training never uses (``numbers.HELD_OUT_BANDS``: its start or an operand, each with probability 1/2).

Labels follow ProcessBench / PRM800K: a step is correct (1) only if it and every step before it are.
"""

from __future__ import annotations

import random

from prmserve.bundled.word_problems.drills import make_drill
from prmserve.bundled.word_problems.problems import Op, Problem, apply, make_problem
from prmserve.bundled.word_problems.solutions import ERROR_KINDS, Plan, Solution, eligible_steps, plan_solution, write_solution
from prmserve.bundled.word_problems.step_grammar import STEP_GRAMMAR_SHARE
from prmserve.errors import InvalidInputError

SPLITS = ("train", "validation", "test")
ERROR_WEIGHTS = {"bad_operation": 0.25, "slip": 0.35, "wrong_carry": 0.2, "wrong_final": 0.2}

__all__ = [
    "ERROR_KINDS", "SPLITS", "Op", "Problem", "Solution", "apply", "corrupt", "generate", "generate_candidates",
    "make_drill", "make_problem", "make_solution", "slip_pairs",
]


def _is_test(split: str) -> bool:
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    return split == "test"


def make_solution(rng: random.Random, p: Problem, step_grammar_share: float = STEP_GRAMMAR_SHARE,
                  value_grammar_share: float = 0.0) -> Solution:
    """A correct solution of ``p``, worded at random (a training one's steps partly by ``step_grammar``)."""
    return write_solution(plan_solution(rng, p, step_grammar_share, value_grammar_share), rng)


def corrupt(rng: random.Random, p: Problem, plan: Plan | None = None, step_grammar_share: float = STEP_GRAMMAR_SHARE,
            value_grammar_share: float = 0.0) -> Solution:
    """A solution of ``p`` with exactly one error, of a random kind at a random step where it fits."""
    plan = plan or plan_solution(rng, p, step_grammar_share, value_grammar_share)
    kinds, weights = zip(*ERROR_WEIGHTS.items())
    while True:
        kind = rng.choices(kinds, weights)[0]
        solution = write_solution(plan, rng, kind, rng.choice(eligible_steps(plan, kind)))
        if solution is not None:
            return solution


def generate(n: int, seed: int, split: str = "train", p_correct: float = 0.5,
             step_grammar_share: float = STEP_GRAMMAR_SHARE, value_grammar_share: float = 0.0) -> list[tuple[Problem, Solution]]:
    """``n`` (problem, solution) pairs of a split; each solution is correct with probability ``p_correct``
    (``step_grammar_share`` / ``value_grammar_share``: of a training split's claim steps / start, restate and final
    steps, those worded by ``step_grammar``)."""
    test, rng = _is_test(split), random.Random(f"{split}-{seed}")
    out = []
    for _ in range(n):
        p = make_problem(rng, test)
        out.append((p, make_solution(rng, p, step_grammar_share, value_grammar_share) if rng.random() < p_correct
                    else corrupt(rng, p, step_grammar_share=step_grammar_share, value_grammar_share=value_grammar_share)))
    return out


def generate_candidates(n: int, seed: int, k: int = 4, p_correct: float = 0.4,
                        split: str = "test") -> list[tuple[Problem, list[Solution]]]:
    """``n`` problems with ``k`` candidate solutions each (each correct with probability ``p_correct``), for best-of-k."""
    test, rng = _is_test(split), random.Random(f"candidates-{split}-{seed}")
    out = []
    for _ in range(n):
        p = make_problem(rng, test)
        out.append((p, [make_solution(rng, p) if rng.random() < p_correct else corrupt(rng, p) for _ in range(k)]))
    return out


def slip_pairs(n: int, seed: int, split: str = "test") -> list[tuple[Problem, Solution, Solution]]:
    """``n`` problems, each with a correct solution and a copy of it that differs by one slipped result."""
    test, rng = _is_test(split), random.Random(f"slips-{split}-{seed}")
    out = []
    while len(out) < n:
        p = make_problem(rng, test)
        plan = plan_solution(rng, p)
        slipped = write_solution(plan, rng, "slip", rng.choice(eligible_steps(plan, "slip")))
        if slipped is not None:
            out.append((p, write_solution(plan, rng), slipped))
    return out
