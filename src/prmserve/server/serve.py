"""Run the app with uvicorn: loopback by default; SIGTERM/SIGINT stop accepting, drain in-flight work, exit 0."""

from __future__ import annotations

import signal

import uvicorn

from prmserve.prm import PRM
from prmserve.server.app import DEFAULT_MAX_BODY_BYTES, create_app


def run_server(
    prm: PRM,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_timeout: float | None = None,
    log_level: str = "info",
) -> None:
    """Serve `prm` until a signal; uvicorn finishes open requests, then the lifespan closes the engine."""
    app = create_app(prm, api_key=api_key, max_body_bytes=max_body_bytes, default_timeout=default_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
    # uvicorn re-raises the stopping signal once it has drained; a drained, graceful stop is a success.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
