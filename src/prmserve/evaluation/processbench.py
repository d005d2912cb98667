"""ProcessBench's evaluation for any PRM: is the first step scored below a threshold the first wrong step?

Data as ProcessBench publishes it: records with `id`, `problem`, `steps`, `label` (index of the first
wrong step, -1 when every step is right) and optionally `generator` and `final_answer_correct`, in a
JSON list or JSONL, one file per subset. Accuracy on erroneous solutions (the first step below the
threshold is exactly `label`), on correct ones (no step below it), and their harmonic mean (F1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prmserve.evaluation import metrics
from prmserve.errors import InvalidInputError

Scorer = Callable[[list[dict[str, Any]]], list[list[float]]]


def load_records(path: Path) -> list[dict[str, Any]]:
    """ProcessBench records of one file (JSON list or JSONL), checked, naming the file and record of any fault."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not JSON or JSONL: {exc}") from None
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or not {"problem", "steps", "label"} <= set(record):
            raise InvalidInputError(f"{where}: needs 'problem', 'steps' and 'label'")
        steps, label = record["steps"], record["label"]
        if not isinstance(steps, list) or not steps:
            raise InvalidInputError(f"{where}: 'steps' must be a non-empty list")
        if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
            raise InvalidInputError(f"{where}: 'label' must be -1 or a step index below {len(steps)}")
    return records


def evaluate(subsets: dict[str, list[dict[str, Any]]], score: Scorer, threshold: float | None = 0.5,
             calibration: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per subset and overall: the two accuracies and F1 at `threshold`, or at the threshold that maximises
    F1 on `calibration` records (threshold None)."""
    chosen_on = None
    if threshold is None:
        if not calibration:
            raise InvalidInputError("choosing the threshold needs calibration records")
        threshold = metrics.best_threshold(score(calibration), [r["label"] for r in calibration])
        chosen_on = len(calibration)
    report: dict[str, Any] = {"threshold": threshold, "threshold_chosen_on": chosen_on, "subsets": {}}
    all_rewards, all_labels, skipped = [], [], 0
    for name, records in subsets.items():
        scored = [(r, record["label"]) for r, record in zip(score(records), records) if r is not None]
        skipped += len(records) - len(scored)
        rewards, labels = [r for r, _ in scored], [label for _, label in scored]
        report["subsets"][name] = _scores(rewards, labels, threshold)
        all_rewards += rewards
        all_labels += labels
    report["overall"] = _scores(all_rewards, all_labels, threshold)
    report["skipped_too_long"] = skipped  # records longer than the model takes (None from the scorer)
    return report


def _scores(rewards: list[list[float]], labels: Sequence[int], threshold: float) -> dict[str, Any]:
    """Accuracy on erroneous and on correct solutions, their harmonic mean, and the counts behind them
    (a subset without one of the two groups has 0 accuracy there, and so F1 0)."""
    hits: dict[bool, list[bool]] = {True: [], False: []}
    for r, label in zip(rewards, labels):
        hits[label >= 0].append(metrics.predicted_first_error(r, threshold) == label)
    acc_err = sum(hits[True]) / len(hits[True]) if hits[True] else 0.0
    acc_ok = sum(hits[False]) / len(hits[False]) if hits[False] else 0.0
    f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok else 0.0
    return {"acc_erroneous": acc_err, "acc_correct": acc_ok, "f1": f1, "n": len(labels),
            "n_erroneous": len(hits[True]), "n_correct": len(hits[False])}


def table(report: dict[str, Any]) -> str:
    """The report as a text table: one row per subset, then overall."""
    rows = [f"threshold {report['threshold']:.4g}" + (f" (chosen on {report['threshold_chosen_on']} records)" if report["threshold_chosen_on"] else "")
            + (f"; {report['skipped_too_long']} records longer than the model takes were left out" if report["skipped_too_long"] else ""),
            f"{'subset':24s} {'n':>6s} {'erroneous':>10s} {'correct':>8s} {'F1':>6s}"]
    for name, s in [*report["subsets"].items(), ("overall", report["overall"])]:
        rows.append(f"{name:24s} {s['n']:6d} {s['acc_erroneous']:10.3f} {s['acc_correct']:8.3f} {s['f1']:6.3f}")
    return "\n".join(rows)
