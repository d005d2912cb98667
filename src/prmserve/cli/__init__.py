"""The `prmserve` command: one function pair (add_arguments, run) per subcommand, registered in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prmserve import __version__, missing_dependency
from prmserve.batch import (
    OfflineScorer,
    RemoteScorer,
    Scorer,
    count_lines,
    line_batches,
    resume_point,
    score_batch,
)
from prmserve.errors import PRMServeError
from prmserve.results import AGGREGATIONS

if TYPE_CHECKING:
    from prmserve.prm import PRM


@dataclass(frozen=True)
class Subcommand:
    """A `prmserve` subcommand: its one-line help, how it adds its arguments, and what it runs (exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# Shared model options -------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose how a PRM is loaded (the model itself is each subcommand's own argument)."""
    parser.add_argument("--format", help="PRM format (default: detected from the checkpoint)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    parser.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prefixes")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
        help="an engine option (max_num_seqs, block_size, kv_cache_gb, num_kv_blocks, ...) or a format option "
             "(system_prompt, step_tag, ...), repeatable; README.md's 'Python API' lists them all; VALUE is read as "
             "JSON when it parses, else as a string",
    )


def load_prm(args: argparse.Namespace, model: str | None, **engine_options: Any) -> PRM:
    """A `PRM` from the shared model options (`model` None loads the bundled model)."""
    from prmserve.prm import PRM

    options: dict[str, Any] = dict(args.option) | engine_options
    if args.max_num_batched_tokens is not None:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return _owned(PRM(model, format=args.format, device=args.device, dtype=args.dtype, **options))


def _owned(prm: PRM) -> PRM:
    """The PRM of a command that owns the whole process: its loaded heap frozen (`freeze_heap` says why)."""
    from prmserve.engine.loop import freeze_heap

    freeze_heap()
    return prm


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# serve ----------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve serve [MODEL]`: vLLM's flag names (defined in prmserve.server.args, imported only here)."""
    from prmserve.server.args import add_serve_arguments as add

    add(parser, option_type=_key_value)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it over HTTP until SIGTERM/SIGINT."""
    from prmserve.server.args import prm_options, server_settings
    from prmserve.server.serve import load_for_serving, run_server

    settings = server_settings(args)
    if args.data_parallel_size < 1:
        raise ValueError("--data-parallel-size must be >= 1")
    if args.data_parallel_size > 1:  # the engines in Ray actors, this process the router (tokeniser, handles, HTTP)
        prm = _owned(_load_replicas(args, prm_options(args), settings))
    else:
        prm = _owned(load_for_serving(args.model, prm_options(args), settings, seed=args.seed))
    run_server(prm, settings)
    return 0


def _load_replicas(args: argparse.Namespace, options: dict[str, Any], settings: Any) -> PRM:
    """`--data-parallel-size N`: N `PRMActor` replicas behind a `RoutedPRM`, which tokenises here (so the chat template
    applies here)."""
    try:
        from prmserve.ray import RoutedPRM
    except ImportError as exc:
        raise ValueError(f"--data-parallel-size needs Ray: pip install 'prmserve[ray]' ({exc})") from None
    from prmserve.server.serve import read_chat_template

    prm = RoutedPRM(args.model, args.data_parallel_size, **options)
    if settings.chat_template is not None:
        prm.tokenizer.chat_template = read_chat_template(settings.chat_template)
    settings.notes.append(f"data parallel: {args.data_parallel_size} engine replicas on Ray, routed by prefix affinity")
    return prm


# ui -------------------------------------------------------------------------------------------


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve ui [MODEL]`: `prmserve serve`'s flags, and whether to open the page in a browser."""
    add_serve_arguments(parser)
    parser.add_argument("--no-browser", action="store_true", help="serve the page without opening a browser")


def run_ui(args: argparse.Namespace) -> int:
    """Serve as `prmserve serve` does; once the server listens (the model loads first), open its page at /."""
    import socket
    import threading
    import time
    import webbrowser

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # a wildcard bind answers on loopback
    url = f"{'https' if args.ssl_certfile else 'http'}://{f'[{host}]' if ':' in host else host}:{args.port}/"

    def open_when_listening() -> None:
        while True:
            try:
                socket.create_connection((host, args.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        webbrowser.open(url)

    if not args.no_browser:
        threading.Thread(target=open_when_listening, daemon=True).start()
    return run_serve(args)


# score ----------------------------------------------------------------------------------------


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve score INPUT -o OUTPUT`: offline (`--model`) or against a server (`--url`)."""
    parser.add_argument("input", type=Path, help="JSONL, one {problem, steps, ...} per line")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results; resumed if it exists")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="score offline with this checkpoint (default: the bundled model)")
    where.add_argument("--url", help="score against a prmserve server at this URL")
    parser.add_argument("--api-key", default=os.environ.get("PRMSERVE_API_KEY"), help="the server's key (with --url)")
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


# demo -----------------------------------------------------------------------------------------


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


# evaluate -------------------------------------------------------------------------------------


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


# search ---------------------------------------------------------------------------------------


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
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="score offline with this checkpoint (default: the bundled model)")
    where.add_argument("--url", help="score against a prmserve server at this URL")
    parser.add_argument("--api-key", default=os.environ.get("PRMSERVE_API_KEY"), help="the server's key (with --url)")
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


# eval -----------------------------------------------------------------------------------------


def _eval_commands():
    """The eval subcommands' module, imported when used (it needs no torch until it loads a model)."""
    from prmserve.evaluation import commands

    return commands


# main -----------------------------------------------------------------------------------------

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command killed by SIGPIPE (`yes | head` -> 141)

SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("score the bundled problems with a PRM and show each step's reward", add_demo_arguments, run_demo),
    "evaluate": Subcommand("held-out quality on the bundled model's task (ProcessBench F1, best-of-4)",
                           add_evaluate_arguments, run_evaluate),
    "eval": Subcommand("evaluate any PRM: ProcessBench first-error F1, best-of-N against majority vote",
                       lambda parser: _eval_commands().add_eval_arguments(parser), lambda args: _eval_commands().run_eval(args)),
    "serve": Subcommand("serve a PRM over HTTP (vLLM-compatible /pooling too)", add_serve_arguments, run_serve),
    "score": Subcommand("score a JSONL file, offline or against a server", add_score_arguments, run_score),
    "ui": Subcommand("serve a PRM and open its web page: paste or upload solutions, see each step's reward",
                     add_ui_arguments, run_ui),
    "search": Subcommand("best-of-N or beam search over an OpenAI-compatible generator, scored by a PRM",
                         add_search_arguments, run_search),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="prmserve", description="Serve and run process reward models.")
    parser.add_argument("--version", action="version", version=f"prmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `prmserve` and `python -m prmserve`."""
    try:
        try:
            return _run(build_parser().parse_args(argv))
        finally:
            sys.stdout.flush()  # a reader gone early (`| head`) shows here, not in an exit-time traceback
    except BrokenPipeError:  # stop quietly, as a tool killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered has somewhere to go
        return SIGPIPE_STATUS


def _run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; an error the user can fix is one line on stderr and status 1."""
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (PRMServeError, ValueError) as exc:  # bad model, option or setting: a message, not a traceback
        print(f"prmserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # installed with --no-deps, or a dependency removed since
        hint = missing_dependency(exc)
        if hint is None:
            raise
        print(f"prmserve {args.command} {hint}", file=sys.stderr)
        return 1
