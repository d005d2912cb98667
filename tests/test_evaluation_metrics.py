"""Tests for the PRM quality metrics on hand-made step rewards."""

import pytest

from prmserve.evaluation import metrics

# Four solutions: two correct (first error -1), two with errors at steps 1 and 0.
REWARDS = [
    [0.9, 0.8, 0.95],  # correct, judged correct for t <= 0.8
    [0.9, 0.3, 0.2],  # error at 1, found for 0.3 < t <= 0.9
    [0.4, 0.9],  # error at 0, found for t > 0.4
    [0.7, 0.6, 0.9],  # correct, judged correct for t <= 0.6
]
FIRST_ERRORS = [-1, 1, 0, -1]


def test_predicted_first_error():
    assert metrics.predicted_first_error([0.9, 0.3, 0.2], 0.5) == 1
    assert metrics.predicted_first_error([0.9, 0.8], 0.5) == -1
    assert metrics.predicted_first_error([0.5, 0.1], 0.5) == 1  # equal to the threshold is not an error
    assert metrics.predicted_first_error([], 0.5) == -1


def test_processbench_scores():
    s = metrics.processbench_scores(REWARDS, FIRST_ERRORS, 0.5)
    assert s == {"acc_erroneous": 1.0, "acc_correct": 1.0, "f1": 1.0}
    s = metrics.processbench_scores(REWARDS, FIRST_ERRORS, 0.65)
    assert s["acc_erroneous"] == 1.0 and s["acc_correct"] == 0.5
    assert s["f1"] == pytest.approx(2 * 0.5 / 1.5)
    s = metrics.processbench_scores(REWARDS, FIRST_ERRORS, 0.35)
    assert s["acc_erroneous"] == 0.5 and s["acc_correct"] == 1.0


def test_processbench_wrong_step_named_is_a_miss():
    s = metrics.processbench_scores([[0.2, 0.1], [0.9]], [1, -1], 0.5)  # flags step 0, error is at 1
    assert s == {"acc_erroneous": 0.0, "acc_correct": 1.0, "f1": 0.0}


def test_best_threshold_maximises_f1():
    t = metrics.best_threshold(REWARDS, FIRST_ERRORS)
    assert 0.4 < t <= 0.6
    assert metrics.processbench_scores(REWARDS, FIRST_ERRORS, t)["f1"] == 1.0


def test_best_threshold_trades_off_when_no_perfect_cut():
    rewards = [[0.3], [0.6], [0.5], [0.9]]
    first_errors = [-1, -1, 0, 0]  # correct ones score lower than an erroneous one
    t = metrics.best_threshold(rewards, first_errors)
    best = metrics.processbench_scores(rewards, first_errors, t)["f1"]
    for cut in [0.0, 0.2, 0.4, 0.55, 0.7, 1.0]:
        assert metrics.processbench_scores(rewards, first_errors, cut)["f1"] <= best + 1e-12


def test_best_of_n_uses_min_step_reward():
    rewards = [[[0.9, 0.1], [0.6, 0.7], [0.5, 0.5]]]  # max mean is candidate 0, max min is candidate 1
    assert metrics.best_of_n_accuracy(rewards, [[3, 5, 7]], [5]) == 1.0
    assert metrics.best_of_n_accuracy(rewards, [[3, 5, 7]], [3]) == 0.0


def test_majority_vote_and_random_pick():
    answers = [[1, 1, 2, 3], [4, 5, 5, 4], [7, 8, 9, 9]]
    truth = [1, 4, 7]
    # problem 0: majority 1 right; problem 1: tie 4/5 -> 0.5; problem 2: majority 9 wrong
    assert metrics.majority_vote_accuracy(answers, truth) == pytest.approx(1.5 / 3)
    assert metrics.random_pick_accuracy(answers, truth) == pytest.approx((0.5 + 0.5 + 0.25) / 3)
