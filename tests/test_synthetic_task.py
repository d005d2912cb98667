"""The held-out evaluation on the word problems (`evaluation.word_problem_task`), driven by scorers whose answers are known."""

from __future__ import annotations

import pytest

from prmserve.bundled import word_problems
from prmserve.evaluation.word_problem_task import held_out_quality, slip_pair_ranking


def oracle(pairs):
    """A perfect PRM: each step's label, softened."""
    return [[0.9 if label else 0.1 for label in s.labels] for _, s in pairs]


def constant(pairs):
    return [[0.7] * len(s.steps) for _, s in pairs]


def late(pairs):
    """Finds every error one step late (the last step of a solution on time)."""
    out = []
    for _, s in pairs:
        e = s.first_error
        if 0 <= e < len(s.steps) - 1:
            e += 1
        out.append([0.1 if e >= 0 and k >= e else 0.9 for k in range(len(s.steps))])
    return out


def test_a_perfect_prm_scores_one_everywhere() -> None:
    report = held_out_quality(oracle, seed=3, n_val=60, n_test=120, n_best_of=40, n_slip_pairs=50)
    pb = report["processbench"]
    assert pb["f1"] == pb["acc_erroneous"] == pb["acc_correct"] == 1.0
    assert all(pb[f"acc_{kind}"] == 1.0 for kind in word_problems.ERROR_KINDS)
    assert report["slip_pairs"] == {"correct_above_slip": 1.0, "n_pairs": 50}
    best = report["best_of_4"]
    assert best["n_problems"] == 40 and best["prm_min_step"] > best["majority_vote"] > 0
    assert 0 < best["random_pick"] < best["prm_min_step"]


def test_a_prm_that_never_objects_finds_no_error_and_ranks_no_pair() -> None:
    report = held_out_quality(constant, seed=3, n_val=60, n_test=120, n_best_of=40, n_slip_pairs=50)
    assert report["processbench"]["acc_erroneous"] == 0.0 and report["processbench"]["acc_correct"] == 1.0
    assert report["processbench"]["f1"] == 0.0
    assert report["slip_pairs"]["correct_above_slip"] == 0.0  # ties are not above


def test_an_error_found_one_step_late_is_a_miss_but_still_ranks_the_pair() -> None:
    report = held_out_quality(late, seed=3, n_val=60, n_test=120, n_best_of=40, n_slip_pairs=50)
    pb = report["processbench"]
    assert pb["acc_correct"] == 1.0 and pb["acc_wrong_final"] == 1.0  # a final answer is the last step
    assert 0 < pb["acc_erroneous"] < 0.6
    assert report["slip_pairs"]["correct_above_slip"] == 1.0


def test_slip_pairs_are_ranked_by_their_minimum_step_reward() -> None:
    pairs = word_problems.slip_pairs(4, seed=1)
    rewards = iter([[0.9, 0.8], [0.9, 0.3], [0.6, 0.9], [0.7, 0.9], [0.9], [0.95], [0.5, 0.5], [0.5, 0.4]])
    ranking = slip_pair_ranking(lambda items: [next(rewards) for _ in items], pairs)
    assert ranking == {"correct_above_slip": pytest.approx(2 / 4), "n_pairs": 4}


def test_a_given_threshold_is_used_and_no_validation_split_is_scored() -> None:
    scored = []

    def counting(pairs):
        scored.append(len(pairs))
        return oracle(pairs)

    report = held_out_quality(counting, seed=3, n_val=60, n_test=120, n_best_of=40, n_slip_pairs=50, threshold=0.5)
    assert report["processbench"]["threshold"] == 0.5 and report["processbench"]["n_val"] == 0
    assert report["processbench"]["f1"] == 1.0
    assert scored == [120, 160, 100]  # test split, best-of-4 candidates, slip pairs: no validation split
