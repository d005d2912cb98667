"""The README's first command: score bundled problems with the bundled PRM and show what it judged.

Each candidate solution is printed step by step with its reward (coloured on a terminal), then the
best-of-N pick per problem by the minimum step reward, as PRM papers select solutions. Where the file says
where each solution's first error is (``first_errors``: a step index, or -1), the demo prints it beside
the model's judgement.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from prmserve.errors import InvalidInputError
from prmserve.problem_lines import parse_problem_line
from prmserve.results import ScoreResult

DEMO_PROBLEMS = Path(__file__).parent / "demo_problems.jsonl"


def load_problems(path: Path = DEMO_PROBLEMS) -> list[dict[str, Any]]:
    """Problems with candidate solutions: {"problem", "solutions": [[step, ...], ...], "answer"?, "first_errors"?};
    a bad line is named."""
    if not path.is_file():
        raise InvalidInputError(f"no such problems file: {path}")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            problems.append(_checked_problem(line))
        except ValueError as exc:
            raise InvalidInputError(f"{path}:{number}: {exc}") from None
    if not problems:
        raise InvalidInputError(f"{path}: no problems in the file")
    return problems


def _checked_problem(line: str) -> dict[str, Any]:
    """One line's problem, or ValueError saying what is wrong with it."""
    problem = parse_problem_line(line)
    solutions = problem.get("solutions")
    if not isinstance(solutions, list) or not solutions:
        raise ValueError("'solutions' must be a non-empty list of solutions, each a list of step strings")
    for index, steps in enumerate(solutions):
        if not isinstance(steps, list) or not steps or not all(isinstance(step, str) for step in steps):
            raise ValueError(f"solution {index} must be a non-empty list of step strings")
    first_errors = problem.get("first_errors")
    if first_errors is not None and (
        not isinstance(first_errors, list) or len(first_errors) != len(solutions)
        or not all(type(e) is int and -1 <= e < len(steps) for e, steps in zip(first_errors, solutions))
    ):
        raise ValueError("'first_errors' must hold, per solution, the index of its first wrong step or -1")
    return problem


def _paint(text: str, reward: float, colour: bool) -> str:
    if not colour:
        return text
    code = "32" if reward >= 0.7 else "33" if reward >= 0.3 else "31"  # green, yellow, red
    return f"\033[{code}m{text}\033[0m"


def _written(first_error: int) -> str:
    return "written correct" if first_error < 0 else f"written with an error in step {first_error + 1}"


def render(problems: list[dict[str, Any]], results: list[list[ScoreResult]], out: TextIO, colour: bool) -> None:
    """Write every problem, its solutions' step rewards, and the best-of-N pick."""
    for number, (problem, scored) in enumerate(zip(problems, results), start=1):
        out.write(f"\nProblem {number}: {problem['problem']}\n")
        scores = [r.aggregate("min") for r in scored]
        best = max(range(len(scores)), key=scores.__getitem__)
        first_errors = problem.get("first_errors")
        for index, (steps, result) in enumerate(zip(problem["solutions"], scored)):
            mark = "  <- best of %d" % len(scored) if index == best else ""
            written = "" if first_errors is None else f", {_written(first_errors[index])}"
            out.write(f"  Solution {chr(65 + index)} (min step reward {scores[index]:.3f}{written}){mark}\n")
            for step, reward in zip(steps, result.step_rewards):
                out.write(f"    {_paint(f'{reward:.3f}', reward, colour)}  {step}\n")
        answer = problem.get("answer")
        out.write(f"  Best-of-{len(scored)} pick: solution {chr(65 + best)}" + (f" (true answer: {answer})" if answer is not None else "") + "\n")


def run_demo(prm: Any, problems: list[dict[str, Any]], out: TextIO | None = None) -> list[list[ScoreResult]]:
    """Score every candidate of every problem (`load_problems`) in one batch and print them (to stdout as it is now)."""
    out = sys.stdout if out is None else out
    items = [{"problem": p["problem"], "steps": s} for p in problems for s in p["solutions"]]
    flat = prm.score(items)
    results, start = [], 0
    for p in problems:
        results.append(flat[start : start + len(p["solutions"])])
        start += len(p["solutions"])
    out.write(f"prmserve demo: {prm.model_name} ({prm.format_name}) judged {len(items)} solutions "
              f"to {len(problems)} problems, step by step.\n")
    render(problems, results, out, colour=out.isatty())
    return results
