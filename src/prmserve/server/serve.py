"""Run the app with uvicorn: loopback by default; SIGTERM/SIGINT stop accepting, let in-flight work finish within
--shutdown-timeout (what is left then gets 503), exit 0."""

from __future__ import annotations

import copy
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import torch
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from prmserve.engine.model_runner import ModelRunner
from prmserve.prm import PRM
from prmserve.server.app import create_app, effective_max_model_len
from prmserve.server.args import ServerSettings
from prmserve.server.middleware import Shutdown

logger = logging.getLogger("prmserve")
ANSWER_MARGIN_S = 1.0  # the app answers what is left this long before uvicorn's bound cancels it


def load_for_serving(model: str | None, options: dict[str, Any], settings: ServerSettings, seed: int | None = None) -> PRM:
    """The PRM the flags describe: seeded, loaded, with the chat template of `--chat-template` if given."""
    if seed is not None:
        torch.manual_seed(seed)
    prm = PRM(model, **options)
    if settings.chat_template is not None:
        prm.tokenizer.chat_template = read_chat_template(settings.chat_template)
    return prm


def read_chat_template(given: str) -> str:
    """vLLM's rule: a path to an existing file is read; anything else is the template itself."""
    path = Path(given)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # a long template is not a valid path
        pass
    if not any(mark in given for mark in ("{{", "{%")):
        raise ValueError(f"--chat-template {given!r} is neither a file nor a Jinja template")
    return given


class BoundedShutdownServer(uvicorn.Server):
    """uvicorn's server that tells the app when it stops accepting, so what is still unanswered `answer_within`
    seconds later gets a 503 before uvicorn's own bound (`timeout_graceful_shutdown`) cancels it."""

    def __init__(self, config: uvicorn.Config, stopping: Shutdown, answer_within: float) -> None:
        super().__init__(config)
        self.stopping = stopping
        self.answer_within = answer_within

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stopping.begin(self.answer_within)
        await super().shutdown(sockets)


def run_server(prm: PRM, settings: ServerSettings | None = None) -> None:
    """Serve `prm` until a signal; uvicorn finishes open requests within the shutdown bound, then the lifespan
    closes the engine."""
    settings = settings or ServerSettings()
    app = create_app(
        prm, api_key=settings.api_key, protect_metrics=settings.protect_metrics, max_body_bytes=settings.max_body_bytes,
        body_read_timeout=settings.body_read_timeout, max_items_per_request=settings.max_items_per_request,
        default_timeout=settings.default_timeout, served_model_names=settings.served_model_names,
        max_model_len=settings.max_model_len, allowed_origins=settings.allowed_origins, log_requests=settings.log_requests,
        rl_aggregate=settings.rl_aggregate,
    )
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_keep_alive=30,
        timeout_graceful_shutdown=settings.shutdown_timeout, root_path=settings.root_path,
        ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile, log_config=_logging_config(),
    )  # configures logging, so the startup lines below have their handler
    for line in startup_lines(prm, settings):
        logger.info(line)
    # uvicorn re-raises the stopping signal once it has drained; a drained, graceful stop is a success.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    answer_within = max(settings.shutdown_timeout - ANSWER_MARGIN_S, settings.shutdown_timeout / 2)
    BoundedShutdownServer(config, app.state.shutdown, answer_within).run()


def startup_lines(prm: PRM, settings: ServerSettings) -> list[str]:
    """What `vllm serve` tells before it listens: the model, its limits, the KV pool, how it runs, where."""
    blocks = prm.engine.blocks
    kv_bytes = blocks.num_blocks * ModelRunner.bytes_per_block(prm.model, blocks.block_size, prm.dtype)
    scheme = "https" if settings.ssl_certfile else "http"
    names = settings.served_model_names or [prm.model_name]
    return [
        *settings.notes,
        f"model: {prm.model_name} ({prm.path})",
        f"served model name: {', '.join(names)}",
        f"format: {prm.format_name}; dtype: {str(prm.dtype).removeprefix('torch.')}; device: {prm.device}",
        f"max model length: {effective_max_model_len(prm, settings.max_model_len)} tokens",
        f"KV pool: {blocks.num_blocks} blocks of {blocks.block_size} tokens = {blocks.num_blocks * blocks.block_size} tokens, "
        f"{kv_bytes / 1024**3:.2f} GiB; prefix caching {'on' if prm.engine.config.enable_prefix_caching else 'off'}",
        f"compile mode: {_compile_mode(prm)}",
        f"serving on {scheme}://{settings.host}:{settings.port}{settings.root_path}",
    ]


def _compile_mode(prm: PRM) -> str:
    if not prm.compiled:
        return "eager"
    graphs = prm.engine.runner.graphs
    return "compiled (torch.compile)" + (f", {len(graphs.graphs)} CUDA graphs for small steps" if graphs else "")


def _logging_config() -> dict[str, Any]:
    """uvicorn's logging set-up plus the "prmserve" logger (startup and request lines) at INFO, on uvicorn's format."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["prmserve"] = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s [prmserve] %(message)s"}
    config["handlers"]["prmserve"] = {"formatter": "prmserve", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    config["loggers"]["prmserve"] = {"handlers": ["prmserve"], "level": "INFO", "propagate": False}
    return config
