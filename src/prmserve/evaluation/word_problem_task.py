"""Held-out quality of a PRM on the word problems (`prmserve.bundled.word_problems`), whatever scores it: what the
bundled model is trained and judged on (issue #16's floors); `synthetic_task` is the first bundled model's.

The threshold is chosen on the validation split (training's templates and numbers) or given; everything else
is measured on the test split, written with held-out templates, names, items and number bands: ProcessBench
F1, how often each error kind's first error is named exactly, best-of-4 (the PRM's pick by its minimum step
reward against majority vote and a random pick), and how often a correct solution's minimum step reward
beats that of its copy with one slipped result.
"""

from __future__ import annotations

from typing import Any

from prmserve.bundled import word_problems
from prmserve.evaluation import processbench
from prmserve.evaluation.synthetic_task import Scorer, accuracy_by_kind, as_records, best_of_4


def held_out_quality(score: Scorer, seed: int, n_val: int = 600, n_test: int = 1000, n_best_of: int = 300,
                     n_slip_pairs: int = 300, threshold: float | None = None) -> dict[str, Any]:
    """ProcessBench F1 (at ``threshold``, else at the one chosen on ``n_val`` validation solutions) and its accuracy
    per error kind, best-of-4 accuracy against baselines, and the share of correct solutions ranked above their
    one-slip copies."""
    test = word_problems.generate(n_test, seed, "test")
    calibration = None if threshold is not None else as_records(word_problems.generate(n_val, seed, "validation"))
    scored: dict[int, list[float]] = {}  # the test split's rewards, kept for the per-kind accuracy

    def by_records(records: list[dict[str, Any]]) -> list[list[float]]:
        rewards = score([record["pair"] for record in records])
        scored.update({id(record["pair"]): r for record, r in zip(records, rewards)})
        return rewards

    test_records = as_records(test)
    report = processbench.evaluate({"word_problems": test_records}, by_records, threshold=threshold, calibration=calibration)
    threshold, overall = report["threshold"], report["overall"]
    test_rewards = [scored[id(record["pair"])] for record in test_records]
    return {
        "processbench": {"threshold": threshold, "acc_erroneous": overall["acc_erroneous"], "acc_correct": overall["acc_correct"],
                         "f1": overall["f1"], **accuracy_by_kind(test_rewards, test, threshold, word_problems.ERROR_KINDS),
                         "n_test": n_test, "n_val": 0 if calibration is None else n_val},
        "best_of_4": best_of_4(score, word_problems.generate_candidates(n_best_of, seed, split="test")),
        "slip_pairs": slip_pair_ranking(score, word_problems.slip_pairs(n_slip_pairs, seed, "test")),
    }


def slip_pair_ranking(score: Scorer, pairs: list[tuple[Any, Any, Any]]) -> dict[str, Any]:
    """Share of (problem, correct, one-slip copy) triples where the correct solution's minimum step reward is above the copy's."""
    rewards = score([(p, s) for p, right, wrong in pairs for s in (right, wrong)])
    above = [min(rewards[2 * i]) > min(rewards[2 * i + 1]) for i in range(len(pairs))]
    return {"correct_above_slip": sum(above) / len(above), "n_pairs": len(pairs)}
