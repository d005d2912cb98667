"""prmserve: every popular open process reward model, scored exactly as its reference code does."""

from importlib import metadata

from prmserve.errors import (
    CheckpointError,
    FormatError,
    HandleNotFoundError,
    InputTooLongError,
    InvalidInputError,
    PRMServeError,
    QueueFullError,
    RequestCancelledError,
)
from prmserve.results import ScoreResult, TokenUsage

try:
    __version__ = metadata.version("prmserve")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

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
    "HandleNotFoundError",
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
        try:
            from prmserve import client
        except ModuleNotFoundError as exc:  # installed with --no-deps, or a dependency removed since
            hint = missing_dependency(exc)
            if hint is None:
                raise
            raise ImportError(f"prmserve.{name} {hint}") from None
        return getattr(client, name)
    raise AttributeError(f"module 'prmserve' has no attribute {name!r}")


_DISTRIBUTIONS = {"prometheus_client": "prometheus-client"}  # import name -> pip name, where they differ


def missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """Which dependency is missing and the pip command that installs it; None when the module is prmserve's own."""
    top = (exc.name or "prmserve").split(".")[0]
    if top == "prmserve":
        return None
    package = _DISTRIBUTIONS.get(top, top)
    return f"needs the {package!r} package, which is not installed: pip install {package}"
