"""`prmserve evaluate`: a checkpoint's held-out quality on the bundled model's tasks, printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing

from prmserve.cli.common import add_model_arguments, load_prm

EVALUATION_TASKS = ("synthetic", "word_problems")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint directory or hub ID (default: the bundled model)")
    parser.add_argument("--seed", type=int, help="training seed whose held-out splits to use (default: the checkpoint's)")
    parser.add_argument("--task", choices=EVALUATION_TASKS,
                        help="synthetic: the first bundled model's arithmetic task; word_problems: typed word problems with a "
                             "template hold-out (the bundled model's). Default: the task the checkpoint's quality.json "
                             "names; synthetic for one that names none (written before tasks were named)")
    add_model_arguments(parser)


def run_evaluate(args: argparse.Namespace) -> int:
    """Held-out quality on the checkpoint's task (or `--task`), printed as JSON."""
    from prmserve.evaluation import held_out_quality, prm_scorer, word_problem_task

    with closing(load_prm(args, args.model)) as prm:
        trained = prm.path / "quality.json"
        quality = json.loads(trained.read_text()) if trained.is_file() else {}
        seed = args.seed if args.seed is not None else quality.get("training", {}).get("seed")
        if seed is None:
            raise SystemExit("--seed is needed: this checkpoint has no quality.json naming its training seed")
        task = args.task or quality.get("task", "synthetic")
        if task not in EVALUATION_TASKS:
            raise SystemExit(f"quality.json names the task {task!r}, which this version cannot run; pass --task")
        measure = word_problem_task.held_out_quality if task == "word_problems" else held_out_quality
        report = {"task": task, "seed": seed, **measure(prm_scorer(prm, progress=sys.stderr.isatty()), seed)}
    print(json.dumps(report, indent=2))
    return 0
