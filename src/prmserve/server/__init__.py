"""The HTTP server: a FastAPI app around one `PRM`; `prmserve.server.args` imports without the server stack."""

__all__ = ["create_app"]


def __getattr__(name: str):
    """Import the app (fastapi, uvicorn) on first use, so `prmserve --help` can read the serve flags without them."""
    if name == "create_app":
        from prmserve.server.app import create_app

        return create_app
    raise AttributeError(f"module 'prmserve.server' has no attribute {name!r}")
