"""vLLM's sleep-mode routes: `POST /sleep?level=`, `POST /wake_up`, `GET /is_sleeping`, for RL frameworks that lend
the reward model's GPU memory to a generator between scoring phases (verl / OpenRLHF colocated mode)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from fastapi import FastAPI, Query

from prmserve.engine.sleep import SleepReport
from prmserve.server.protocol import IsSleepingResponse, SleepResponse


class Sleeper(Protocol):
    """What the routes need: a `PRM`, or a router over replicas."""

    is_sleeping: bool

    def sleep(self, level: int = 1) -> SleepReport: ...

    def wake_up(self) -> None: ...


def add_sleep_routes(app: FastAPI, prm: Sleeper, dependencies: list, responses: dict[int | str, dict[str, Any]]) -> None:
    """Register the three routes; while asleep, scoring routes answer 503 with Retry-After (the app's error map)."""

    @app.post("/sleep", response_model=SleepResponse, responses=responses, dependencies=dependencies)
    async def sleep(level: int = Query(1, ge=1, le=2, description="1: weights to host memory; 2: weights dropped, "
                                                                  "reloaded from the checkpoint on wake_up")) -> SleepResponse:
        """Refuse new work (503), let what was submitted finish, then free the KV pool and move or drop the weights."""
        report = await asyncio.to_thread(prm.sleep, level)
        return SleepResponse(level=report.level, freed_bytes=report.freed_bytes, measured_by=report.measured_by,
                             seconds=report.seconds)

    @app.post("/wake_up", responses=responses, dependencies=dependencies)
    async def wake_up() -> dict:
        """Restore the weights and a KV pool; scoring works again once this answers."""
        await asyncio.to_thread(prm.wake_up)
        return {}

    @app.get("/is_sleeping", response_model=IsSleepingResponse, responses=responses, dependencies=dependencies)
    async def is_sleeping() -> IsSleepingResponse:
        """Whether the engine sleeps (from a /sleep call until its /wake_up)."""
        return IsSleepingResponse(is_sleeping=prm.is_sleeping)
