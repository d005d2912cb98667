"""`prmserve score`: a JSONL file scored into another, offline or against a server, resumable."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prmserve.batch import (
    OfflineScorer,
    RemoteScorer,
    Scorer,
    count_lines,
    line_batches,
    resume_point,
    score_batch,
)
from prmserve.cli.common import add_model_arguments, add_scorer_arguments, load_prm
from prmserve.results import AGGREGATIONS


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve score INPUT -o OUTPUT`: offline (`--model`) or against a server (`--url`)."""
    parser.add_argument("input", type=Path, help="JSONL, one {problem, steps, ...} per line")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results; resumed if it exists")
    add_scorer_arguments(parser)
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="min")
    parser.add_argument("--priority", type=int, default=0, help="lower runs first")
    parser.add_argument("--batch-size", type=int, default=256, help="lines scored together")
    add_model_arguments(parser)


def run_score(args: argparse.Namespace) -> int:
    """Score a JSONL file into another, in input order, resuming where a previous run stopped."""
    from tqdm import tqdm
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if not args.input.is_file():
        raise SystemExit(f"no such input file: {args.input}")
    done = resume_point(args.output)
    with _open_scorer(args) as scorer, args.input.open(encoding="utf-8") as source, args.output.open("a", encoding="utf-8") as out:
        total = count_lines(args.input)
        bad = 0
        with tqdm(total=total, initial=min(done, total), desc="scoring", unit="line") as bar:
            for batch in line_batches(source, start_after=done, size=args.batch_size):
                for record in score_batch(batch, scorer, args.aggregate):
                    if "error" in record:
                        bad += 1
                        print(f"{args.input}:{record['line']}: {record['error']}", file=sys.stderr)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                bar.update(len(batch))
    if bad:
        print(f"{bad} line(s) could not be scored; see the error records in {args.output}", file=sys.stderr)
    return 0


def _open_scorer(args: argparse.Namespace) -> Scorer:
    if args.url:
        return RemoteScorer(args.url, args.api_key, args.priority)
    return OfflineScorer(load_prm(args, args.model))
