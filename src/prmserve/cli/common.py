"""What every subcommand shares: the `Subcommand` record, and the options that load a PRM (and loading it)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prmserve.prm import PRM


@dataclass(frozen=True)
class Subcommand:
    """A `prmserve` subcommand: its one-line help, how it adds its arguments, and what it runs (exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


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


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a command's scores come from: a checkpoint loaded here (`--model`) or a server (`--url`, `--api-key`)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", help="score offline with this checkpoint (default: the bundled model)")
    where.add_argument("--url", help="score against a prmserve server at this URL")
    parser.add_argument("--api-key", default=os.environ.get("PRMSERVE_API_KEY"), help="the server's key (with --url)")


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
