"""`prmserve demo`: the bundled problems scored by a PRM, each step's reward and the best-of-N pick shown."""

from __future__ import annotations

import argparse
from contextlib import closing
from pathlib import Path

from prmserve.cli.common import add_model_arguments, load_prm


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint directory or hub ID (default: the bundled model)")
    parser.add_argument("--problems", type=Path, help="JSONL of {problem, solutions, answer} (default: bundled)")
    add_model_arguments(parser)


def run_demo(args: argparse.Namespace) -> int:
    """Print each step's reward and the best-of-N pick; the problems are checked before the model loads."""
    from prmserve.bundled.demo import DEMO_PROBLEMS, load_problems
    from prmserve.bundled.demo import run_demo as demo

    problems = load_problems(args.problems or DEMO_PROBLEMS)
    with closing(load_prm(args, args.model)) as prm:
        demo(prm, problems)
    return 0
