"""prmserve: every popular open process reward model, scored exactly as its reference code does."""

from prmserve.errors import (
    CheckpointError,
    FormatError,
    InputTooLongError,
    InvalidInputError,
    PRMServeError,
    QueueFullError,
    RequestCancelledError,
)
from prmserve.results import ScoreResult, TokenUsage

__all__ = [
    "PRM",
    "Client",
    "AsyncClient",
    "ScoreResult",
    "TokenUsage",
    "PRMServeError",
    "InvalidInputError",
    "InputTooLongError",
    "FormatError",
    "CheckpointError",
    "QueueFullError",
    "RequestCancelledError",
]


def __getattr__(name: str):
    """Import heavy parts on first use: the client needs no torch, the engine no httpx."""
    if name == "PRM":
        from prmserve.prm import PRM

        return PRM
    if name in ("Client", "AsyncClient"):
        from prmserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'prmserve' has no attribute {name!r}")
