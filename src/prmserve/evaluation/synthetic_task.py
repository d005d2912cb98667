"""Held-out quality of a PRM on the synthetic arithmetic task, whatever scores it (training model or `PRM`).

The splits are the ones the bundled model's training script reports in quality.json: validation
(seed + 1) picks the ProcessBench threshold, test (seed + 2) measures it, and best-of-4 problems
(seed + 3) compare picking by the minimum step reward with majority vote and a random pick.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prmserve import quality, synthetic

Pairs = list[tuple[synthetic.Problem, synthetic.Solution]]
Scorer = Callable[[Pairs], list[list[float]]]


def held_out_quality(score: Scorer, seed: int, n_val: int = 600, n_test: int = 1000, n_best_of: int = 300) -> dict[str, Any]:
    """ProcessBench F1 (threshold chosen on validation), its accuracy per error kind, and best-of-4 accuracy against baselines."""
    val, test = synthetic.generate(n_val, seed + 1), synthetic.generate(n_test, seed + 2)
    candidates = synthetic.generate_candidates(n_best_of, seed + 3)
    threshold = quality.best_threshold(score(val), [s.first_error for _, s in val])
    test_rewards = score(test)
    processbench = quality.processbench_scores(test_rewards, [s.first_error for _, s in test], threshold)
    processbench.update(accuracy_by_kind(test_rewards, test, threshold))
    flat = score([(p, s) for p, sols in candidates for s in sols])
    per_problem, start = [], 0
    for _, sols in candidates:
        per_problem.append(flat[start : start + len(sols)])
        start += len(sols)
    answers = [[s.final_answer for s in sols] for _, sols in candidates]
    truth = [p.answer for p, _ in candidates]
    return {
        "processbench": {"threshold": threshold, **processbench, "n_test": n_test, "n_val": n_val},
        "best_of_4": {
            "prm_min_step": quality.best_of_n_accuracy(per_problem, answers, truth),
            "majority_vote": quality.majority_vote_accuracy(answers, truth),
            "random_pick": quality.random_pick_accuracy(answers, truth),
            "n_problems": n_best_of,
        },
    }


def accuracy_by_kind(rewards: list[list[float]], pairs: Pairs, threshold: float) -> dict[str, float]:
    """Share of erroneous solutions whose first error is named exactly, per injected error kind."""
    out = {}
    for kind in synthetic.ERROR_KINDS:
        hits = [quality.predicted_first_error(r, threshold) == s.first_error
                for r, (_, s) in zip(rewards, pairs) if s.error_kind == kind]
        out[f"acc_{kind}"] = sum(hits) / max(1, len(hits))
    return out


def prm_scorer(prm: Any, progress: bool = False) -> Scorer:
    """Score (problem, solution) pairs with a `PRM`, in one batch."""
    return lambda pairs: [r.step_rewards for r in prm.score([{"problem": p.text, "steps": s.steps} for p, s in pairs], progress=progress)]
