"""Held-out quality of a PRM on the synthetic word problems, whatever scores it (training model or `PRM`):
a case of the ProcessBench and best-of-N evaluations, on generated data.

The threshold is chosen on the validation split (training's templates and numbers); everything else is
measured on the test split, written with held-out templates and number bands (`prmserve.word_problems`):
ProcessBench F1, how often each error kind's first error is named exactly, best-of-4 (the PRM's pick by
its minimum step reward against majority vote and a random pick), and how often a correct solution's
minimum step reward beats that of its copy with one slipped result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prmserve import quality, word_problems
from prmserve.evaluation import best_of_n, processbench

Pairs = list[tuple[word_problems.Problem, word_problems.Solution]]
Scorer = Callable[[Pairs], list[list[float]]]


def held_out_quality(score: Scorer, seed: int, n_val: int = 600, n_test: int = 1000, n_best_of: int = 300,
                     n_slip_pairs: int = 300, threshold: float | None = None) -> dict[str, Any]:
    """ProcessBench F1 (at ``threshold``, else at the one chosen on ``n_val`` validation solutions) and its accuracy
    per error kind, best-of-4 accuracy against baselines, and the share of correct solutions ranked above their
    one-slip copies."""
    test = word_problems.generate(n_test, seed, "test")
    calibration = None if threshold is not None else _records(word_problems.generate(n_val, seed, "validation"))
    scored: dict[int, list[float]] = {}  # the test split's rewards, kept for the per-kind accuracy

    def by_records(records: list[dict[str, Any]]) -> list[list[float]]:
        rewards = score([record["pair"] for record in records])
        scored.update({id(record["pair"]): r for record, r in zip(records, rewards)})
        return rewards

    test_records = _records(test)
    report = processbench.evaluate({"synthetic": test_records}, by_records, threshold=threshold, calibration=calibration)
    threshold, overall = report["threshold"], report["overall"]
    test_rewards = [scored[id(record["pair"])] for record in test_records]
    return {
        "processbench": {"threshold": threshold, "acc_erroneous": overall["acc_erroneous"], "acc_correct": overall["acc_correct"],
                         "f1": overall["f1"], **accuracy_by_kind(test_rewards, test, threshold), "n_test": n_test,
                         "n_val": 0 if calibration is None else n_val},
        "best_of_4": best_of_4(score, word_problems.generate_candidates(n_best_of, seed, split="test")),
        "slip_pairs": slip_pair_ranking(score, word_problems.slip_pairs(n_slip_pairs, seed, "test")),
    }


def best_of_4(score: Scorer, candidates: list[tuple[word_problems.Problem, list[word_problems.Solution]]]) -> dict[str, Any]:
    """Accuracy of the PRM's pick among each problem's candidates (highest minimum step reward), majority vote and a random pick."""
    problems = [{"problem": p.text, "answer": p.answer, "solutions": [{"pair": (p, s), "final_answer": s.final_answer} for s in sols]}
                for p, sols in candidates]
    best = best_of_n.evaluate(problems, lambda items: score([item["pair"] for item in items]), item_of=lambda s: {"pair": s["pair"]})
    answers = [[s.final_answer for s in sols] for _, sols in candidates]
    return {
        "prm_min_step": best["accuracy"]["prm_min"][4],
        "majority_vote": best["accuracy"]["majority_vote"][4],
        "random_pick": quality.random_pick_accuracy(answers, [p.answer for p, _ in candidates]),
        "n_problems": len(candidates),
    }


def slip_pair_ranking(score: Scorer, pairs: list[tuple[word_problems.Problem, word_problems.Solution, word_problems.Solution]]) -> dict[str, Any]:
    """Share of pairs where the correct solution's minimum step reward is above its one-slip copy's."""
    rewards = score([(p, s) for p, right, wrong in pairs for s in (right, wrong)])
    above = [min(rewards[2 * i]) > min(rewards[2 * i + 1]) for i in range(len(pairs))]
    return {"correct_above_slip": sum(above) / len(above), "n_pairs": len(pairs)}


def _records(pairs: Pairs) -> list[dict[str, Any]]:
    """ProcessBench-style records of generated solutions, each carrying its pair for the scorer."""
    return [{"problem": p.text, "steps": s.steps, "label": s.first_error, "pair": (p, s)} for p, s in pairs]


def accuracy_by_kind(rewards: list[list[float]], pairs: Pairs, threshold: float) -> dict[str, float]:
    """Share of erroneous solutions whose first error is named exactly, per injected error kind."""
    out = {}
    for kind in word_problems.ERROR_KINDS:
        hits = [quality.predicted_first_error(r, threshold) == s.first_error
                for r, (_, s) in zip(rewards, pairs) if s.error_kind == kind]
        out[f"acc_{kind}"] = sum(hits) / max(1, len(hits))
    return out


def prm_scorer(prm: Any, progress: bool = False) -> Scorer:
    """Score (problem, solution) pairs with a `PRM`, in one batch."""
    return lambda pairs: [r.step_rewards for r in prm.score([{"problem": p.text, "steps": s.steps} for p, s in pairs], progress=progress)]
