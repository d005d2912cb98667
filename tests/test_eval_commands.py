"""`prmserve eval processbench|best-of-n`: the metrics on small files computed by hand, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prmserve import cli
from prmserve.errors import InvalidInputError
from prmserve.evaluation import best_of_n, processbench

# Rewards a fake scorer gives each solution, keyed by its first step.
REWARDS = {
    "a1": [0.9, 0.8, 0.2],  # first below 0.5: step 2
    "b1": [0.9, 0.7],  # none below 0.5
    "c1": [0.3, 0.9],  # step 0
    "d1": [0.6, 0.4, 0.45],  # step 1
}


def fake_score(items: list[dict]) -> list[list[float]]:
    return [REWARDS[item["steps"][0]] for item in items]


def records(*pairs: tuple[str, int]) -> list[dict]:
    return [{"id": f"r{i}", "problem": "p", "steps": [key] + ["s"] * (len(REWARDS[key]) - 1), "label": label}
            for i, (key, label) in enumerate(pairs)]


def test_processbench_metric_by_hand() -> None:
    # erroneous: a1 label 2 (predicted 2: hit), c1 label 1 (predicted 0: miss), d1 label 1 (hit) -> 2/3
    # correct: b1 -1 (predicted -1: hit) -> 1/1; F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    subsets = {"gsm8k": records(("a1", 2), ("c1", 1), ("b1", -1)), "math": records(("d1", 1))}
    report = processbench.evaluate(subsets, fake_score, threshold=0.5)
    assert report["overall"]["acc_erroneous"] == pytest.approx(2 / 3)
    assert report["overall"]["acc_correct"] == 1.0
    assert report["overall"]["f1"] == pytest.approx(0.8)
    assert report["subsets"]["gsm8k"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)  # erroneous 1/2, correct 1/1
    assert report["subsets"]["math"] == {"acc_erroneous": 1.0, "acc_correct": 0.0, "f1": 0.0, "n": 1, "n_erroneous": 1, "n_correct": 0}
    assert "overall" in processbench.table(report)


def test_processbench_threshold_chosen_on_calibration() -> None:
    # On the calibration records c1 labelled 0 is judged right when t > 0.3 (its step 0, 0.3, falls below t)
    # and b1 (correct) when t <= 0.7 (no step below t): F1 is 1 exactly for t in (0.3, 0.7].
    report = processbench.evaluate({"x": records(("c1", 0))}, fake_score, threshold=None, calibration=records(("c1", 0), ("b1", -1)))
    assert 0.3 < report["threshold"] <= 0.7 and report["threshold_chosen_on"] == 2
    assert report["overall"]["acc_erroneous"] == 1.0


def test_processbench_records_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "p", "steps": ["a"], "label": 3}) + "\n")
    with pytest.raises(InvalidInputError, match="bad.jsonl: record 0: 'label' must be -1 or a step index below 1"):
        processbench.load_records(path)


def solution(key: str, answer: str, correct: bool | None = None) -> dict:
    out = {"steps": [key] + ["s"] * (len(REWARDS[key]) - 1), "final_answer": answer}
    if correct is not None:
        out["correct"] = correct
    return out


def test_best_of_n_by_hand() -> None:
    # Problem 1 (answer 5): a1 says 4 (min .2, last .2), b1 says 5 (min .7), c1 says 4 (min .3), d1 says 4 (min .4).
    # Problem 2 (answer 7): c1 says 7 (min .3), d1 says 8 (min .4), a1 says 7, b1 says 8 (min .7).
    problems = [
        {"problem": "p1", "answer": "5", "solutions": [solution("a1", "4"), solution("b1", "$5"), solution("c1", "4"), solution("d1", "4")]},
        {"problem": "p2", "answer": "7", "solutions": [solution("c1", "7"), solution("d1", "8"), solution("a1", "7.0"), solution("b1", "8", correct=False)]},
    ]
    report = best_of_n.evaluate(problems, fake_score)
    acc = report["accuracy"]
    assert report["sizes"] == [1, 2, 4]
    # N=1: first solutions: p1 a1 wrong, p2 c1 right -> 0.5 for every method that picks among one.
    assert acc["prm_min"][1] == acc["majority_vote"][1] == acc["oracle"][1] == 0.5
    # N=2, min: p1 picks b1 (.7 > .2) right; p2 picks d1 (.4 > .3) wrong -> 0.5. Oracle: both have a right one -> 1.
    assert acc["prm_min"][2] == 0.5 and acc["oracle"][2] == 1.0
    # N=2 majority: p1 {4, 5} tie -> 1/2, p2 {7, 8} tie -> 1/2 -> 0.5
    assert acc["majority_vote"][2] == 0.5
    # N=4, min: p1 b1 (.7) right; p2 b1 (.7, says 8, labelled wrong) wrong -> 0.5.
    assert acc["prm_min"][4] == 0.5
    # N=4 majority: p1 "4" x3 wrong; p2 7 x2 vs 8 x2 tie -> 1/2 -> 0.25
    assert acc["majority_vote"][4] == 0.25
    # N=4 weighted (min): p1 4: .2+.3+.4=.9 vs 5: .7 -> wrong; p2 7: .3+.2=.5 vs 8: .4+.7=1.1 -> wrong -> 0
    assert acc["weighted_majority_min"][4] == 0.0
    assert acc["oracle"][4] == 1.0


def test_cli_end_to_end(qwen_prm_dir: Path, tmp_path: Path, capsys) -> None:
    bench = tmp_path / "subset.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in [
        {"id": "0", "problem": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "The answer is 5."], "label": -1},
        {"id": "1", "problem": "What is 2 + 3?", "steps": ["2 + 3 = 6.", "The answer is 6."], "label": 0},
    ]))
    report = tmp_path / "report.json"
    assert cli.main(["eval", "processbench", str(bench), "--model", str(qwen_prm_dir), "--device", "cpu", "--report", str(report)]) == 0
    assert "subset" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert saved["threshold"] == 0.5 and saved["overall"]["n"] == 2
    problems = tmp_path / "bon.jsonl"
    problems.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5", "solutions": [
        {"completion": "2 + 3 = 5.\n\nThe answer is 5.", "final_answer": "5"}, {"steps": ["2 + 3 = 6."], "final_answer": "6"}]}) + "\n")
    assert cli.main(["eval", "best-of-n", str(problems), "--model", str(qwen_prm_dir), "--device", "cpu"]) == 0
    assert "majority_vote" in capsys.readouterr().out


def test_bundled_gsm8k_sample_loads() -> None:
    """The shipped best-of-4 sample: 200 real GSM8K problems, four labelled solutions each."""
    path = Path(best_of_n.__file__).parent.parent / "bundled" / "gsm8k_best_of_4.jsonl"
    problems = best_of_n.load_problems(path)
    assert len(problems) == 200 and all(len(p["solutions"]) == 4 for p in problems)
    assert any(s["correct"] for p in problems for s in p["solutions"])


def test_best_of_n_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    problems = [{"problem": "p", "answer": "5", "solutions": [solution("a1", "4"), solution("b1", "5")]}]
    out = tmp_path / "bon.png"
    best_of_n.plot(best_of_n.evaluate(problems, fake_score), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_solutions_too_long_for_the_model_are_left_out_and_counted() -> None:
    def score(items: list[dict]) -> list:
        return [None if item["steps"][0] == "c1" else REWARDS[item["steps"][0]] for item in items]

    report = processbench.evaluate({"x": records(("a1", 2), ("c1", 1), ("b1", -1))}, score, threshold=0.5)
    assert report["skipped_too_long"] == 1 and report["overall"]["n"] == 2 and report["overall"]["f1"] == 1.0
    problems = [{"problem": "p", "answer": "5", "solutions": [solution("a1", "4"), solution("b1", "5")]},
                {"problem": "q", "answer": "5", "solutions": [solution("c1", "4"), solution("b1", "5")]}]
    best = best_of_n.evaluate(problems, score)
    assert best["n_problems"] == 1 and best["skipped_too_long"] == 1
