"""The web page at `/`: paste or upload solutions, score them through `POST /v1/score`, see every step's reward."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/ui-assets"
STATIC_DIR = files("prmserve.server") / "static" / "ui"


def add_ui(app: FastAPI) -> None:
    """The page at `/` and its script and style under ASSETS_PATH, all from the package (it works offline)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=str(STATIC_DIR)), name="ui-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html")
