"""`PRMDeployment`: a Ray Serve deployment of a `RoutedPRM`, for a user's own Serve app. Its one Serve replica is the
router (tokenising, node handles, the HTTP API of `prmserve serve` at its route prefix); the engines are its
`data_parallel_size` `PRMActor`s. Other deployments call it through a handle:
`await handle.score.remote(items)`, `extend`, `release`, `sleep`, `wake_up`, `is_sleeping`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from prmserve.engine.sleep import SleepReport
from prmserve.ray.routed import RoutedPRM
from prmserve.results import ScoreResult


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class PRMDeployment:
    """`RoutedPRM(model, data_parallel_size, **options)` behind Serve; `app_options` go to `create_app`
    (api_key, served_model_names, ...)."""

    def __init__(self, model: str | None = None, data_parallel_size: int = 1, app_options: Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        self.prm = RoutedPRM(model, data_parallel_size, **options)
        self.app_options = dict(app_options or {})

    def __serve_build_asgi_app__(self):
        """The same FastAPI app `prmserve serve` runs, over this deployment's replicas."""
        from prmserve.server.app import create_app

        return create_app(self.prm, **self.app_options)

    async def score(self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False) -> list[ScoreResult]:
        return await self.prm.score_async(items, priority, keep)

    async def extend(self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False) -> list[ScoreResult]:
        return await self.prm.extend_async(handle, children, priority, keep)

    def release(self, handles: str | Sequence[str]) -> int:
        return self.prm.release(handles)

    async def sleep(self, level: int = 1) -> SleepReport:
        return await asyncio.to_thread(self.prm.sleep, level)

    async def wake_up(self) -> None:
        await asyncio.to_thread(self.prm.wake_up)

    def is_sleeping(self) -> bool:
        return self.prm.is_sleeping


def build_app(model: str | None = None, data_parallel_size: int = 1, **options: Any) -> Application:
    """The deployment bound to its arguments: `serve.run(build_app(MODEL, 2))`, or bind `PRMDeployment` inside
    your own app and pass its handle to your deployments."""
    return PRMDeployment.bind(model, data_parallel_size, **options)
