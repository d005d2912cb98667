"""The HTTP server: a FastAPI app around one `PRM` (needs the `serve` extra)."""

from prmserve.server.app import create_app

__all__ = ["create_app"]
