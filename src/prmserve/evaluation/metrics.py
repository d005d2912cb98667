"""Quality metrics for a PRM from its step rewards: ProcessBench F1 and best-of-n selection.

All functions take plain step rewards (lists of floats), so they can be driven by any scorer:
the training-time model or prmserve's ``PRM``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np


def predicted_first_error(step_rewards: Sequence[float], threshold: float) -> int:
    """Index of the first step whose reward is below ``threshold``; -1 if none (solution judged correct)."""
    for k, r in enumerate(step_rewards):
        if r < threshold:
            return k
    return -1


def processbench_scores(
    rewards: Sequence[Sequence[float]], first_errors: Sequence[int], threshold: float
) -> dict[str, float]:
    """ProcessBench metric: accuracy on erroneous / correct solutions and their harmonic mean (F1)."""
    hits = {True: [], False: []}
    for r, e in zip(rewards, first_errors):
        hits[e >= 0].append(predicted_first_error(r, threshold) == e)
    return _f1(float(np.mean(hits[True])), float(np.mean(hits[False])))


def _f1(acc_err: float, acc_ok: float) -> dict[str, float]:
    """Bundle the two accuracies with their harmonic mean."""
    f1 = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"acc_erroneous": acc_err, "acc_correct": acc_ok, "f1": f1}


def _ok_intervals(rewards: Sequence[Sequence[float]], first_errors: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per solution, the thresholds t in (lo, hi] for which it is judged exactly right."""
    lo, hi = [], []
    for r, e in zip(rewards, first_errors):
        prefix_min = np.minimum.accumulate(np.asarray(r, dtype=np.float64))
        if e < 0:  # correct: no step may fall below t
            lo.append(-np.inf)
            hi.append(prefix_min[-1])
        else:  # erroneous: steps before e stay >= t, step e falls below t
            lo.append(prefix_min[e])
            hi.append(prefix_min[e - 1] if e > 0 else np.inf)
    return np.asarray(lo), np.asarray(hi)


def best_threshold(rewards: Sequence[Sequence[float]], first_errors: Sequence[int]) -> float:
    """The threshold maximising ProcessBench F1 on a validation split (ties: closest to 0.5)."""
    lo, hi = _ok_intervals(rewards, first_errors)
    is_err = np.asarray(first_errors) >= 0
    values = np.unique(np.concatenate([lo[np.isfinite(lo)], hi[np.isfinite(hi)]]))
    cands = np.unique(np.concatenate([values, (values[1:] + values[:-1]) / 2, [0.5]]))
    ok = (cands[None, :] > lo[:, None]) & (cands[None, :] <= hi[:, None])
    acc_err, acc_ok = ok[is_err].mean(axis=0), ok[~is_err].mean(axis=0)
    f1 = np.where(acc_err + acc_ok > 0, 2 * acc_err * acc_ok / np.maximum(acc_err + acc_ok, 1e-12), 0.0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


def best_of_n_accuracy(
    candidate_rewards: Sequence[Sequence[Sequence[float]]],
    candidate_answers: Sequence[Sequence[Hashable]],
    true_answers: Sequence[Hashable],
) -> float:
    """Accuracy when picking, per problem, the candidate with the highest minimum step reward."""
    hits = []
    for rewards, answers, truth in zip(candidate_rewards, candidate_answers, true_answers):
        scores = [min(r) for r in rewards]
        hits.append(answers[int(np.argmax(scores))] == truth)
    return float(np.mean(hits))


def majority_vote_accuracy(candidate_answers: Sequence[Sequence[Hashable]], true_answers: Sequence[Hashable]) -> float:
    """Expected accuracy of majority voting over final answers, ties broken uniformly at random."""
    hits = []
    for answers, truth in zip(candidate_answers, true_answers):
        counts = Counter(answers)
        top = max(counts.values())
        winners = [a for a, c in counts.items() if c == top]
        hits.append(winners.count(truth) / len(winners))
    return float(np.mean(hits))


def random_pick_accuracy(candidate_answers: Sequence[Sequence[Hashable]], true_answers: Sequence[Hashable]) -> float:
    """Expected accuracy of picking one candidate uniformly at random."""
    return float(np.mean([list(a).count(t) / len(a) for a, t in zip(candidate_answers, true_answers)]))
