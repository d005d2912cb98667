"""`prmserve search`: best-of-N or beam search over a generator server, scored offline or by a prmserve server."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from prmserve.cli.common import add_model_arguments, add_scorer_arguments, load_prm
from prmserve.results import AGGREGATIONS


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve search --generator URL --problems FILE -o OUT`: best-of-N or beam search, scored offline or by a server."""
    from prmserve.search import DEFAULT_PROMPT_TEMPLATE, METHODS

    parser.add_argument("--generator", required=True, metavar="URL", help="OpenAI-compatible completions server (vLLM's)")
    parser.add_argument("--problems", type=Path, required=True, help="JSONL, one {problem, ...} per line")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results; resumed if it exists")
    parser.add_argument("--method", choices=METHODS, default="best-of-n")
    parser.add_argument("--n", type=int, default=16, help="solutions sampled (best-of-n)")
    parser.add_argument("--width", type=int, default=4, help="beams kept, and continuations asked per beam (beam)")
    parser.add_argument("--depth", type=int, default=40, help="most steps in a solution")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="min", help="how a path's step rewards rank it")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                        help="the prompt before the first step; {problem} is replaced by the problem (default: %(default)r)")
    parser.add_argument("--generator-model", help="the 'model' of completion requests (default: the first in /v1/models)")
    parser.add_argument("--generator-api-key", default=os.environ.get("OPENAI_API_KEY"), help="the generator's key")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens in one step")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0, help="first generator seed (each request of a level adds its index)")
    add_scorer_arguments(parser)
    add_model_arguments(parser)


def run_search(args: argparse.Namespace) -> int:
    """Search each problem into one output line, in input order, resuming where a previous run stopped."""
    from prmserve.search import Generator, SearchConfig, search_file

    config = SearchConfig(args.method, args.n, args.width, args.depth, args.aggregate, args.seed)
    with Generator(args.generator, args.generator_model, args.prompt_template, args.max_tokens, args.temperature,
                   args.generator_api_key) as generator:  # a generator that cannot be reached fails before the PRM loads
        if args.url:
            from prmserve.client import Client

            scorer: Any = Client(args.url, api_key=args.api_key)
        else:
            scorer = load_prm(args, args.model)
        with closing(scorer):
            errors = search_file(args.problems, args.output, generator, scorer, config)
    for record in errors:
        print(f"{args.problems}:{record['line']}: {record['error']}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) could not be searched; see the error records in {args.output}", file=sys.stderr)
    return 0
