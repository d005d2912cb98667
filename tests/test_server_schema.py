"""Property-based requests from the app's own OpenAPI schema: valid and invalid ones one at a time, and valid
sequences that follow the schema's links with real node handles (score -> extend -> release). No 5xx, invalid
requests get a 4xx, valid ones never a 422, every answer conforms to the schema."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
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
STATEFUL_EXAMPLES = 30


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


NON_BLANK = {"type": "string", "pattern": r"\S"}


def _walkable(raw: dict) -> dict:
    """The app's schema narrowed for walking node handles through its links: /v1/score takes kept problem + steps
    items of non-blank text, so every 200 carries handles for /v1/extend and /v1/release; /v1/extend takes children
    of non-blank steps (blank ones get 400 before the handle matters); no `timeout` (a random one would make the walk
    depend on timing); /v1/extend's own links dropped, as schemathesis starts sequences at every operation with
    links, and a /v1/extend begun with a random handle only meets 404."""
    schemas = raw["components"]["schemas"]
    schemas["KeptItem"] = {"type": "object", "required": ["problem", "steps"], "additionalProperties": False,
                           "properties": {"problem": NON_BLANK, "steps": {"type": "array", "minItems": 1, "items": NON_BLANK}}}
    request = schemas["ScoreRequest"]
    request["properties"]["items"]["items"] = {"$ref": "#/components/schemas/KeptItem"}
    request["properties"]["keep"] = {"const": True}
    request["required"].append("keep")
    schemas["ExtendRequest"]["properties"]["children"]["items"] = {"type": "array", "minItems": 1, "items": NON_BLANK}
    for name in ("ScoreRequest", "ExtendRequest"):
        del schemas[name]["properties"]["timeout"]
    del raw["paths"]["/v1/extend"]["post"]["responses"]["200"]["links"]
    return raw


class HandleWalks:
    """Counts sequences that scored a node, extended it (200) and then released it: score -> extend -> release."""

    def __init__(self) -> None:
        self.count = 0
        self.scored: set[str] = set()
        self.extended: set[str] = set()

    def begin(self) -> None:
        self.scored, self.extended = set(), set()

    def note(self, case: schemathesis.Case, response: schemathesis.Response) -> None:
        if response.status_code != 200 or not isinstance(case.body, dict):
            return
        path, answer = case.operation.path, response.json()
        if path == "/v1/score":
            self.scored |= {result["handle"] for result in answer["results"]}
        elif path == "/v1/extend" and case.body["handle"] in self.scored:
            self.extended.add(case.body["handle"])
        elif path == "/v1/release" and answer["released"] and self.extended & set(case.body["handles"]):
            self.extended -= set(case.body["handles"])
            self.count += 1


def test_stateful_sequences_walk_score_extend_release_and_get_no_server_errors(qwen_prm_dir) -> None:
    """Score with `keep`, extend the node and release it, following the schema's links with real handles, in
    random sequences of valid calls (on an app and PRM of its own, with default steps: no timeout to outlast)."""
    from prmserve import PRM

    with PRM(str(qwen_prm_dir), device="cpu", dtype="float32") as prm:
        _walk(create_app(prm, max_body_bytes=1 << 20))


def _walk(app: FastAPI) -> None:
    config = _config()
    config.projects.default.generation.update(modes=[GenerationMode.POSITIVE])  # the narrowing's complement is valid
    linked = schemathesis.openapi.from_dict(_walkable(copy.deepcopy(app.openapi())), config=config)
    linked.app = app
    walks = HandleWalks()

    class Sequences(linked.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            walks.begin()

        def validate_response(self, response, case, **kwargs) -> None:  # noqa: ANN001
            case.validate_response(response, checks=CHECKS)
            walks.note(case, response)

    started = time.monotonic()
    Sequences.run(settings=settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=6, deadline=None, derandomize=True,
                                    suppress_health_check=list(HealthCheck)))
    assert time.monotonic() - started < 60
    assert walks.count >= 4, f"{walks.count} sequences scored a node, extended it and released it (17 alone; at 15 examples, 6 alone and 3 in a full run)"


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
