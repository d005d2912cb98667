"""Best-of-N with a PRM: how often its pick among N sampled solutions is right, against majority vote,
PRM-weighted majority vote (as the Qwen PRM and search-and-learn papers report) and the oracle.

Data: one JSON line per problem, `{"problem", "answer", "solutions": [{"steps" | "completion",
"final_answer", "correct"?}]}`; a solution is right when `correct` says so, else when its final answer
equals the reference after normalisation. N runs over 1, 2, 4, ... up to the solutions of the smallest
problem, always the first N solutions of each problem.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prmserve.errors import InvalidInputError
from prmserve.results import AGGREGATIONS, aggregate

Scorer = Callable[[list[dict[str, Any]]], list[list[float]]]


def load_problems(path: Path) -> list[dict[str, Any]]:
    """The problems of a JSONL file, checked, naming the line of any fault."""
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{number}: bad JSON: {exc}") from None
        solutions = record.get("solutions") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "problem" not in record or "answer" not in record or not solutions:
            raise InvalidInputError(f"{path}:{number}: needs 'problem', 'answer' and a non-empty 'solutions' list")
        for k, solution in enumerate(solutions):
            if not isinstance(solution, dict) or "final_answer" not in solution or not ({"steps", "completion"} & set(solution)):
                raise InvalidInputError(f"{path}:{number}: solution {k} needs 'steps' or 'completion', and 'final_answer'")
        problems.append(record)
    if not problems:
        raise InvalidInputError(f"{path}: no problems")
    return problems


def normalize(answer: Any) -> str:
    """An answer compared as text: no spaces, commas, dollar signs or a trailing full stop; 18.0 = 18."""
    text = re.sub(r"[\s,$]", "", str(answer)).rstrip(".")
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else str(number)


def is_right(solution: dict[str, Any], reference: Any) -> bool:
    return bool(solution["correct"]) if "correct" in solution else normalize(solution["final_answer"]) == normalize(reference)


def evaluate(problems: list[dict[str, Any]], score: Scorer, item_of: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Accuracy by N of the PRM's pick under each aggregation, majority vote, weighted majority vote, oracle.

    `item_of(solution)` is what `score` gets for a solution (default: {problem, steps | completion}).
    """
    items = [item_of(s) if item_of else {"problem": p["problem"], **_text_of(s)} for p in problems for s in p["solutions"]]
    flat = score(items)
    rewards, start, kept = [], 0, []
    for p in problems:  # a problem with a solution longer than the model takes (None) is left out whole
        mine = flat[start : start + len(p["solutions"])]
        start += len(p["solutions"])
        if all(r is not None for r in mine):
            rewards.append(mine)
            kept.append(p)
    skipped, problems = len(problems) - len(kept), kept
    if not problems:
        raise InvalidInputError("no problem left: every one has a solution longer than the model takes")
    largest = min(len(p["solutions"]) for p in problems)
    sizes = [n for n in (2**k for k in range(12)) if n <= largest]
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for n in sizes:
        for method in AGGREGATIONS:
            curves[f"prm_{method}"][n] = _mean(_pick_right(p, r[:n], method) for p, r in zip(problems, rewards))
            curves[f"weighted_majority_{method}"][n] = _mean(_weighted_right(p, r[:n], method) for p, r in zip(problems, rewards))
        curves["majority_vote"][n] = _mean(_majority_right(p, n) for p in problems)
        curves["oracle"][n] = _mean(any(is_right(s, p["answer"]) for s in p["solutions"][:n]) for p in problems)
    steps_right, steps_wrong = _reward_by_step(problems, rewards)
    return {"n_problems": len(problems), "skipped_too_long": skipped, "sizes": sizes, "accuracy": dict(curves),
            "reward_by_step": {"right": steps_right, "wrong": steps_wrong}}


def _text_of(solution: dict[str, Any]) -> dict[str, Any]:
    return {"steps": solution["steps"]} if "steps" in solution else {"completion": solution["completion"]}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def _pick_right(problem: dict, rewards: list[list[float]], method: str) -> bool:
    """The PRM's pick: the solution with the highest aggregate (the first among equals)."""
    scores = [aggregate(r, method) for r in rewards]
    return is_right(problem["solutions"][scores.index(max(scores))], problem["answer"])


def _weighted_right(problem: dict, rewards: list[list[float]], method: str) -> bool:
    """PRM-weighted majority: the final answer whose solutions' aggregates sum highest (first among equals)."""
    totals: dict[str, float] = defaultdict(float)
    firsts: dict[str, dict] = {}
    for solution, r in zip(problem["solutions"], rewards):
        key = normalize(solution["final_answer"])
        totals[key] += aggregate(r, method)
        firsts.setdefault(key, solution)
    best = max(totals, key=lambda k: totals[k])
    return is_right(firsts[best], problem["answer"])


def _majority_right(problem: dict, n: int) -> float:
    """Expected accuracy of majority vote over the first n final answers, ties broken uniformly at random."""
    counts: dict[str, int] = defaultdict(int)
    firsts: dict[str, dict] = {}
    for solution in problem["solutions"][:n]:
        key = normalize(solution["final_answer"])
        counts[key] += 1
        firsts.setdefault(key, solution)
    top = max(counts.values())
    winners = [k for k, c in counts.items() if c == top]
    return sum(is_right(firsts[k], problem["answer"]) for k in winners) / len(winners)


def _reward_by_step(problems: list[dict], rewards: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    """Mean reward at each step index, over right and over wrong solutions (for the plot)."""
    sums = {True: defaultdict(list), False: defaultdict(list)}
    for p, per_solution in zip(problems, rewards):
        for solution, r in zip(p["solutions"], per_solution):
            for k, value in enumerate(r):
                sums[is_right(solution, p["answer"])][k].append(value)
    return tuple([_mean(sums[side][k]) for k in sorted(sums[side])] for side in (True, False))  # type: ignore[return-value]


def table(report: dict[str, Any]) -> str:
    """Accuracy by N, one row per method."""
    sizes = report["sizes"]
    left_out = f" ({report['skipped_too_long']} left out: a solution longer than the model takes)" if report["skipped_too_long"] else ""
    rows = [f"{report['n_problems']} problems{left_out}; accuracy by N", f"{'method':26s}" + "".join(f"{n:>8d}" for n in sizes)]
    for method, curve in report["accuracy"].items():
        rows.append(f"{method:26s}" + "".join(f"{curve[n]:8.3f}" for n in sizes))
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against N (log scale) and mean reward by step for right and wrong solutions."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError("--plot needs matplotlib: pip install matplotlib") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("prm_min", "prm_last", "weighted_majority_min", "majority_vote", "oracle"):
        curve = report["accuracy"][method]
        left.plot(report["sizes"], [curve[n] for n in report["sizes"]], marker="o", label=method)
    left.set_xscale("log", base=2)
    left.set(xlabel="N (solutions per problem)", ylabel="accuracy", title="best-of-N")
    left.legend()
    for side, style in (("right", "-"), ("wrong", "--")):
        values = report["reward_by_step"][side]
        right.plot(range(1, len(values) + 1), values, style, label=f"{side} solutions")
    right.set(xlabel="step", ylabel="mean step reward", title="reward by step")
    right.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
