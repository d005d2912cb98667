"""`prmserve eval processbench FILE...` and `prmserve eval best-of-n FILE`: any model, offline or remote."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prmserve.errors import InputTooLongError

BATCH = 256  # items a scoring call, so the progress bar moves


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The two evaluations, each with the model options of `prmserve score`."""
    from prmserve.cli.common import add_model_arguments, add_scorer_arguments

    kinds = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    processbench = kinds.add_parser("processbench", help="first-error F1 on ProcessBench-format files (one subset a file)")
    processbench.add_argument("files", nargs="+", type=Path, help="JSON or JSONL records {id, problem, steps, label}")
    chosen = processbench.add_mutually_exclusive_group()
    chosen.add_argument("--threshold", type=float, default=0.5, help="a step below it is judged wrong (Qwen's evaluation: 0.5)")
    chosen.add_argument("--choose-threshold-on", type=Path, metavar="FILE", help="pick the F1-maximising threshold on these records")
    best = kinds.add_parser("best-of-n", help="accuracy of the PRM's pick among N solutions against (weighted) majority vote")
    best.add_argument("file", type=Path, help="JSONL: {problem, answer, solutions: [{steps | completion, final_answer}]}")
    best.add_argument("--plot", type=Path, metavar="PNG", help="draw accuracy against N and reward by step (matplotlib)")
    for sub in (processbench, best):
        sub.add_argument("--report", type=Path, metavar="JSON", help="write the full report here")
        add_scorer_arguments(sub)
        add_model_arguments(sub)


def run_eval(args: argparse.Namespace) -> int:
    """Score the files, print the table, write the JSON report (and plot)."""
    from prmserve.evaluation import best_of_n, processbench

    with ExitStack() as stack:
        score = _scorer(args, stack)
        if args.evaluation == "processbench":
            subsets = {path.stem: processbench.load_records(path) for path in args.files}
            calibration = processbench.load_records(args.choose_threshold_on) if args.choose_threshold_on else None
            threshold = None if calibration is not None else args.threshold
            report = processbench.evaluate(subsets, score, threshold, calibration)
            text = processbench.table(report)
        else:
            report = best_of_n.evaluate(best_of_n.load_problems(args.file), score)
            text = best_of_n.table(report)
            if args.plot:
                best_of_n.plot(report, args.plot)
    print(text)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    return 0


def _scorer(args: argparse.Namespace, stack: ExitStack) -> Callable[[list[dict[str, Any]]], list[list[float]]]:
    """Step rewards of items by a local PRM or a server, `BATCH` at a time under a progress bar."""
    if args.url:
        from prmserve.client import Client

        target = stack.enter_context(Client(args.url, api_key=args.api_key))
    else:
        from prmserve.cli.common import load_prm

        target = load_prm(args, args.model)
        stack.callback(target.close)

    def score(items: list[dict[str, Any]]) -> list[list[float] | None]:
        out: list[list[float] | None] = []
        with tqdm(total=len(items), desc="scoring", unit="solution", disable=not sys.stderr.isatty()) as bar:
            for start in range(0, len(items), BATCH):
                batch = items[start : start + BATCH]
                try:
                    out += [r.step_rewards for r in target.score(batch)]
                except InputTooLongError:  # some solution is longer than the model takes: None for those alone
                    out += [_one(target, item) for item in batch]
                bar.update(len(batch))
        return out

    return score


def _one(target: Any, item: dict[str, Any]) -> list[float] | None:
    try:
        return target.score([item])[0].step_rewards
    except InputTooLongError:
        return None
