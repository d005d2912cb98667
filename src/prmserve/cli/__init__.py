"""The `prmserve` command: one module per subcommand (its add_arguments and run), registered in SUBCOMMANDS here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from prmserve import __version__, missing_dependency
from prmserve.cli import demo, evaluate, score, search, serve, ui
from prmserve.cli.common import Subcommand
from prmserve.errors import PRMServeError


def _eval_commands():
    """The eval subcommands' module, imported when used (it needs no torch until it loads a model)."""
    from prmserve.evaluation import commands

    return commands


SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command killed by SIGPIPE (`yes | head` -> 141)

SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("score the bundled problems with a PRM and show each step's reward", demo.add_demo_arguments, demo.run_demo),
    "evaluate": Subcommand("held-out quality on the bundled model's task (ProcessBench F1, best-of-4)",
                           evaluate.add_evaluate_arguments, evaluate.run_evaluate),
    "eval": Subcommand("evaluate any PRM: ProcessBench first-error F1, best-of-N against majority vote",
                       lambda parser: _eval_commands().add_eval_arguments(parser), lambda args: _eval_commands().run_eval(args)),
    "serve": Subcommand("serve a PRM over HTTP (vLLM-compatible /pooling too)", serve.add_serve_arguments, serve.run_serve),
    "score": Subcommand("score a JSONL file, offline or against a server", score.add_score_arguments, score.run_score),
    "ui": Subcommand("serve a PRM and open its web page: paste or upload solutions, see each step's reward",
                     ui.add_ui_arguments, ui.run_ui),
    "search": Subcommand("best-of-N or beam search over an OpenAI-compatible generator, scored by a PRM",
                         search.add_search_arguments, search.run_search),
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
