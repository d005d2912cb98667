"""`prmserve serve`'s flags, named as `vllm serve` names them, and what each turns into (stdlib only: `--help` stays light)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmserve.results import AGGREGATIONS

# The engine's defaults (EngineConfig), shown by --help; tests/test_server_args.py keeps them equal.
# prmserve.models.attention.BACKENDS, named here so that parsing flags imports no torch.
ATTENTION_BACKENDS = ("TRITON_ATTN", "FLASH_ATTN", "TORCH_SDPA")
ENGINE_DEFAULTS = {
    "max_num_batched_tokens": 16384,
    "max_num_seqs": 256,
    "block_size": 16,
    "gpu_memory_utilization": 0.85,
}
DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32", "float32": "float32"}
LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_ITEMS_PER_REQUEST = 4096
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
TRUST_REMOTE_CODE_NOTE = "--trust-remote-code is ignored: prmserve never runs code from a checkpoint"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (the help says what happens then) and for switches."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or action.default in (None, "", []):
            return action.help
        return super()._get_help_string(action)


@dataclass
class ServerSettings:
    """What the HTTP layer needs from the command line (everything that is not a `PRM(...)` option)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] | None = None  # None: the model's own name
    max_model_len: int | None = None  # None: the model's (context bounded by the KV pool)
    api_key: str | None = None
    protect_metrics: bool = False  # /metrics and the API docs behind the key too
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT_S
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    default_timeout: float | None = None
    log_level: str = "info"
    log_requests: bool = True
    root_path: str = ""
    allowed_origins: list[str] | None = None  # None: no CORS headers
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    chat_template: str | None = None  # a file path or the template itself
    rl_aggregate: str = "min"  # how /get_reward and /classify reduce step rewards to one
    notes: list[str] = field(default_factory=list)  # one-line remarks for the startup log


def add_serve_arguments(parser: argparse.ArgumentParser, option_type: Callable[[str], tuple[str, Any]]) -> None:
    """Every `prmserve serve` flag; `option_type` parses `--option KEY=VALUE` (shared with the other subcommands)."""
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("model", nargs="?", help="checkpoint directory or Hugging Face ID (default: the bundled model)")
    parser.add_argument("--config", type=Path, help="YAML file of flags (keys without dashes, - or _); command-line flags win")
    _install_config_expansion(parser)

    where = parser.add_argument_group("where to listen")
    where.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless changed)")
    where.add_argument("--port", type=int, default=8000, help="port to listen on")
    where.add_argument("--root-path", default="", help="ASGI root path, when behind a path-based proxy")
    where.add_argument("--ssl-keyfile", help="serve HTTPS with this key file (with --ssl-certfile)")
    where.add_argument("--ssl-certfile", help="serve HTTPS with this certificate file")
    where.add_argument("--allowed-origins", type=_origins, help="CORS: a JSON list of origins (or one origin); unset: no CORS headers")

    model = parser.add_argument_group("the model")
    model.add_argument("--served-model-name", nargs="+", dest="served_model_names", metavar="NAME",
                       help="name(s) in /v1/models, /pooling's `model` and metric labels; the first is the main one "
                            "(default: the model argument)")
    model.add_argument("--format", help="PRM format (default: detected from the checkpoint)")
    model.add_argument("--dtype", choices=list(DTYPES), default="auto",
                       help="weights and activations; half = float16, float = float32; auto: the checkpoint's on GPU, float32 on CPU")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--tokenizer", help="load the tokenizer and chat template from this directory or hub ID instead")
    model.add_argument("--revision", help="the hub revision (branch, tag or commit) of MODEL")
    model.add_argument("--download-dir", help="download hub checkpoints here instead of the Hugging Face cache")
    model.add_argument("--chat-template", help="chat template for /pooling `messages`: a file path or the template itself")
    model.add_argument("--trust-remote-code", action="store_true", help="accepted and ignored: no checkpoint code is ever run")
    model.add_argument("--seed", type=int, help="torch's random seed")
    model.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", type=option_type,
                       help="an engine or format option (README: Python API), repeatable; VALUE is read as JSON when it parses, "
                            "else as a string")

    engine = parser.add_argument_group("the engine")
    engine.add_argument("--max-model-len", type=int, help="longest input in tokens; longer ones get 400 (default: the model's)")
    engine.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS["max_num_seqs"], help="sequences per engine step")
    engine.add_argument("--max-num-batched-tokens", type=int, default=ENGINE_DEFAULTS["max_num_batched_tokens"],
                        help="tokens per engine step")
    engine.add_argument("--block-size", type=int, default=ENGINE_DEFAULTS["block_size"], help="tokens per KV block (1..16)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=ENGINE_DEFAULTS["gpu_memory_utilization"],
                        help="fraction of the GPU's memory for weights, activations and the KV pool (CUDA only)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV and rewards of prefixes already scored")
    engine.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="alias of --no-enable-prefix-caching")
    engine.add_argument("--enforce-eager", action="store_true", help="do not torch.compile the layers (CUDA)")
    engine.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="bit-identical rewards for an item whatever it is batched with or how much of it was cached "
                             "(batch-invariant matmuls); --no-deterministic for the last few percent of speed")
    engine.add_argument("--attention-backend", type=str.upper, choices=["AUTO", *ATTENTION_BACKENDS], default="AUTO",
                        help="attention kernel: TRITON_ATTN (CUDA; reads cached keys in place), FLASH_ATTN (CUDA), "
                             "TORCH_SDPA (anywhere); auto: the first of these that runs here")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over this many GPUs (processes on the CPU), as vLLM does")
    engine.add_argument("--max-queue", type=int, default=1024, help="requests pending (queued or computing) before 429")
    engine.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine replicas on Ray (pip install 'prmserve[ray]'; RAY_ADDRESS joins a cluster, else a local one "
                             "starts), routed by prefix affinity behind this one HTTP API")

    service = parser.add_argument_group("the service")
    service.add_argument("--api-key", help="require this bearer key (default: env PRMSERVE_API_KEY, else none)")
    service.add_argument("--protect-metrics", action="store_true",
                         help="with --api-key, /metrics, /docs, /redoc and /openapi.json need the key too")
    service.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    service.add_argument("--body-read-timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT_S,
                         help="seconds a request's body may take to arrive, then 408 and the connection closed")
    service.add_argument("--max-items-per-request", type=int, default=DEFAULT_MAX_ITEMS_PER_REQUEST,
                         help="more items (or children, inputs) in one request get 400 before any is tokenised")
    service.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                         help="on SIGTERM, seconds for what computes to finish; what is left then gets 503 and the server exits")
    service.add_argument("--request-timeout", type=float, help="default per-request timeout in seconds (then 504)")
    service.add_argument("--uvicorn-log-level", "--log-level", dest="uvicorn_log_level", default="info", choices=LOG_LEVELS,
                         help="uvicorn's log level (prmserve's startup and request lines are always at info)")
    service.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    service.add_argument("--rl-aggregate", choices=AGGREGATIONS, default="min",
                         help="how /get_reward (OpenRLHF) and /classify (verl) reduce a response's step rewards to one")


def prm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `PRM(...)` keyword arguments the flags ask for."""
    return dict(args.option) | {
        "revision": args.revision,
        "download_dir": args.download_dir,
        "tokenizer": None if args.tokenizer == args.model else args.tokenizer,
        "format": args.format,
        "device": args.device,
        "dtype": DTYPES[args.dtype],
        "enforce_eager": args.enforce_eager,
        "deterministic": args.deterministic,
        "attention_backend": args.attention_backend,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "block_size": args.block_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": args.enable_prefix_caching,
        "max_queue": args.max_queue,
    }


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The HTTP layer's settings from the flags."""
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError("--max-model-len must be >= 1")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for flag in ("body_read_timeout", "shutdown_timeout", "max_items_per_request"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0")
    return ServerSettings(
        host=args.host,
        port=args.port,
        served_model_names=args.served_model_names,
        max_model_len=args.max_model_len,
        api_key=args.api_key if args.api_key is not None else os.environ.get("PRMSERVE_API_KEY"),
        protect_metrics=args.protect_metrics,
        max_body_bytes=args.max_body_bytes,
        body_read_timeout=args.body_read_timeout,
        max_items_per_request=args.max_items_per_request,
        shutdown_timeout=args.shutdown_timeout,
        default_timeout=args.request_timeout,
        log_level=args.uvicorn_log_level,
        log_requests=not args.disable_log_requests,
        root_path=args.root_path,
        allowed_origins=args.allowed_origins,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        chat_template=args.chat_template,
        rl_aggregate=args.rl_aggregate,
        notes=[TRUST_REMOTE_CODE_NOTE] if args.trust_remote_code else [],
    )


def _origins(text: str) -> list[str]:
    """vLLM's JSON list of origins; a bare origin is a list of one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [text]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of origins, got {text!r}")
    return value


def _install_config_expansion(parser: argparse.ArgumentParser) -> None:
    """Expand `--config FILE` into flags placed before the command line's own, so those win (vLLM's semantics).

    The subcommand's parser receives exactly its own arguments in `parse_known_args`; wrapping it there
    works whether `prmserve serve` or `prmserve.cli.main([...])` parses.
    """
    parse = parser.parse_known_args

    def parse_with_config(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        return parse(config_arguments(parser, args) if args is not None else None, namespace)

    parser.parse_known_args = parse_with_config  # type: ignore[method-assign]


def config_arguments(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """`args` with every `--config FILE` replaced by the file's flags in front of them."""
    args = list(args)
    found = [i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")]
    if not found:
        return args
    if len(found) > 1:
        parser.error("--config given more than once")
    at = found[0]
    if "=" in args[at]:
        path, rest = args[at].partition("=")[2], args[:at] + args[at + 1 :]
    elif at + 1 < len(args):
        path, rest = args[at + 1], args[:at] + args[at + 2 :]
    else:
        parser.error("--config needs a file")
    return _flags_from_file(parser, Path(path)) + rest


def _flags_from_file(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """A YAML mapping {flag name: value} as command-line flags."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    flags: list[str] = []
    for key, value in loaded.items():
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)  # argparse has no public lookup by option string
        if action is None or flag == "--config":
            parser.error(f"--config {path}: unknown key {key!r} (keys are `prmserve serve` flags without the dashes)")
        flags.extend(_as_flags(flag, value, action))
    return flags


def _as_flags(flag: str, value: Any, action: argparse.Action) -> list[str]:
    """One config entry as flags: booleans switch, lists fill `nargs` or become JSON, the rest is text."""
    if isinstance(value, bool):
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        if action.nargs == 0:
            return [flag] if value else []
    if isinstance(value, list):
        return [flag, *map(str, value)] if action.nargs in ("+", "*") else [flag, json.dumps(value)]
    return [flag, str(value)]
