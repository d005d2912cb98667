"""Held-out quality of a PRM on the synthetic arithmetic task, whatever scores it (training model or `PRM`):
a case of the ProcessBench and best-of-N evaluations, on generated data.

The splits are the ones the first bundled model's quality.json reports (`prmserve.bundled.synthetic`; commit 02084a6): validation
(seed + 1) picks the ProcessBench threshold, test (seed + 2) measures it, and best-of-4 problems
(seed + 3) compare picking by the minimum step reward with majority vote and a random pick. The word
problems' evaluation (`word_problem_task`) shares the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prmserve.bundled import synthetic
from prmserve.evaluation import best_of_n, metrics, processbench

Pairs = list[tuple[Any, Any]]  # (problem, solution): .text, .answer; .steps, .first_error, .error_kind, .final_answer
Scorer = Callable[[Pairs], list[list[float]]]


def held_out_quality(score: Scorer, seed: int, n_val: int = 600, n_test: int = 1000, n_best_of: int = 300) -> dict[str, Any]:
    """ProcessBench F1 (threshold chosen on validation), its accuracy per error kind, and best-of-4 accuracy against baselines."""
    val, test = synthetic.generate(n_val, seed + 1), synthetic.generate(n_test, seed + 2)
    scored: dict[int, list[float]] = {}  # the test split's rewards, kept for the per-kind accuracy

    def by_records(records: list[dict[str, Any]]) -> list[list[float]]:
        rewards = score([record["pair"] for record in records])
        scored.update({id(record["pair"]): r for record, r in zip(records, rewards)})
        return rewards

    test_records = as_records(test)
    report = processbench.evaluate({"synthetic": test_records}, by_records, threshold=None, calibration=as_records(val))
    threshold, overall = report["threshold"], report["overall"]
    test_rewards = [scored[id(record["pair"])] for record in test_records]
    return {
        "processbench": {"threshold": threshold, "acc_erroneous": overall["acc_erroneous"], "acc_correct": overall["acc_correct"],
                         "f1": overall["f1"], **accuracy_by_kind(test_rewards, test, threshold, synthetic.ERROR_KINDS),
                         "n_test": n_test, "n_val": n_val},
        "best_of_4": best_of_4(score, synthetic.generate_candidates(n_best_of, seed + 3)),
    }


def best_of_4(score: Scorer, candidates: list[tuple[Any, list[Any]]]) -> dict[str, Any]:
    """Accuracy of the PRM's pick among each problem's candidates (highest minimum step reward), majority vote and a random pick."""
    problems = [{"problem": p.text, "answer": p.answer, "solutions": [{"pair": (p, s), "final_answer": s.final_answer} for s in sols]}
                for p, sols in candidates]
    best = best_of_n.evaluate(problems, lambda items: score([item["pair"] for item in items]), item_of=lambda s: {"pair": s["pair"]})
    answers = [[s.final_answer for s in sols] for _, sols in candidates]
    return {
        "prm_min_step": best["accuracy"]["prm_min"][4],
        "majority_vote": best["accuracy"]["majority_vote"][4],
        "random_pick": metrics.random_pick_accuracy(answers, [p.answer for p, _ in candidates]),
        "n_problems": len(candidates),
    }


def as_records(pairs: Pairs) -> list[dict[str, Any]]:
    """ProcessBench-style records of generated solutions, each carrying its pair for the scorer."""
    return [{"problem": p.text, "steps": s.steps, "label": s.first_error, "pair": (p, s)} for p, s in pairs]


def accuracy_by_kind(rewards: list[list[float]], pairs: Pairs, threshold: float,
                     kinds: Sequence[str] = synthetic.ERROR_KINDS) -> dict[str, float]:
    """Share of erroneous solutions whose first error is named exactly, per injected error kind."""
    out = {}
    for kind in kinds:
        hits = [metrics.predicted_first_error(r, threshold) == s.first_error
                for r, (_, s) in zip(rewards, pairs) if s.error_kind == kind]
        out[f"acc_{kind}"] = sum(hits) / max(1, len(hits))
    return out


def prm_scorer(prm: Any, progress: bool = False) -> Scorer:
    """Score (problem, solution) pairs with a `PRM`, in one batch."""
    return lambda pairs: [r.step_rewards for r in prm.score([{"problem": p.text, "steps": s.steps} for p, s in pairs], progress=progress)]
