"""`prmserve serve`: load a PRM (or Ray replicas of it) and serve it over HTTP; the server stack is imported only when run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from prmserve.cli.common import _key_value, _owned

if TYPE_CHECKING:
    from prmserve.prm import PRM


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
