"""Property-based requests from the app's own OpenAPI schema: whatever a client sends, no 5xx."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from prmserve.server import create_app


@pytest.fixture(scope="module")
def small_step_prm(qwen_prm_dir):
    """The tiny PRM with 16-token steps, so a request can outlast a short timeout."""
    from prmserve import PRM

    prm = PRM(str(qwen_prm_dir), device="cpu", dtype="float32", max_num_batched_tokens=16, max_queue=64)
    yield prm
    prm.close()


@pytest.fixture(scope="module")
def app(small_step_prm):
    return create_app(small_step_prm, default_timeout=10.0, max_body_bytes=1 << 20)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    asked_timeout = isinstance(case.body, dict) and case.body.get("timeout") is not None
    if response.status_code == 504 and asked_timeout:
        return  # the client's own deadline passed: a 504 is the documented answer
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"


def test_server_default_timeout_applies_without_a_timeout_in_the_body(small_step_prm) -> None:
    app = create_app(small_step_prm, default_timeout=0.05)
    item = {"problem": " ".join(str(i % 10) for i in range(1500)), "steps": ["so"]}

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.post("/v1/score", json={"items": [item] * 4})

    started = time.monotonic()
    response = asyncio.run(post())
    assert response.status_code == 504
    assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 2
    while small_step_prm.loop.num_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert small_step_prm.loop.num_pending == 0
