"""Property-based requests from the app's own OpenAPI schema, valid and invalid, one at a time and in
stateful sequences: no 5xx, invalid ones get a 4xx, valid ones never a 422, every answer conforms to the schema."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from prmserve.server import create_app

SEED = 20240601
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, negative_data_rejection,
          positive_data_acceptance]
# What data the schema allows may still get: the engine's 400 (no separator in a text, too long for the model),
# 404 (an unknown handle), 413 (over the body limit), 503 (the queue is full), 504 (its timeout passed); never 422.
ACCEPTED = ["2xx", "400", "404", "413", "503", "504"]


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


def _config() -> schemathesis.Config:
    """Positive and negative data, a fixed seed and few examples per operation (a CI-sized run)."""
    config = schemathesis.Config()
    config.update(seed=SEED, max_failures=None)
    config.projects.default.generation.update(modes=list(GenerationMode), max_examples=25)
    config.projects.default.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(expected_statuses=ACCEPTED)
    return config


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=_config())


def _expected_timeout(case: schemathesis.Case, status: int) -> bool:
    """A 504 when the body asked for a timeout: the client's own deadline passed, the documented answer."""
    return status == 504 and isinstance(case.body, dict) and case.body.get("timeout") is not None


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_answers_conform(case: schemathesis.Case) -> None:
    response = case.call()
    if _expected_timeout(case, response.status_code):
        return
    case.validate_response(response, checks=CHECKS)


def _with_links(raw: dict) -> dict:
    """The schema with OpenAPI links: a scored item's handle goes to /v1/extend and /v1/release."""
    handle = "$response.body#/results/0/handle"
    links = {
        "Extend": {"operationId": _operation_id(raw, "/v1/extend"), "requestBody": {"handle": handle, "children": [["So 5."]]}},
        "Release": {"operationId": _operation_id(raw, "/v1/release"), "requestBody": {"handles": [handle]}},
    }
    for path in ("/v1/score", "/v1/extend"):
        raw["paths"][path]["post"]["responses"]["200"]["links"] = links
    return raw


def _operation_id(raw: dict, path: str) -> str:
    return raw["paths"][path]["post"]["operationId"]


def test_stateful_sequences_get_no_server_errors(small_step_prm) -> None:
    """Score with `keep`, extend and release the handles it gave, in random sequences (on an app of its own:
    the one above has been shut down)."""
    app = create_app(small_step_prm, default_timeout=10.0, max_body_bytes=1 << 20)
    linked = schemathesis.openapi.from_dict(_with_links(copy.deepcopy(app.openapi())), config=_config())
    linked.app = app
    state_machine = linked.as_state_machine()

    class Sequences(state_machine):  # type: ignore[misc, valid-type]
        def validate_response(self, response, case, **kwargs) -> None:  # noqa: ANN001
            if not _expected_timeout(case, response.status_code):
                case.validate_response(response, checks=CHECKS)

    started = time.monotonic()
    Sequences.run(settings=settings(max_examples=15, stateful_step_count=5, deadline=None, derandomize=True,
                                    suppress_health_check=list(HealthCheck)))
    assert time.monotonic() - started < 60


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
