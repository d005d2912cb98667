"""What a library must not do to its host program, and inputs that once failed in odd ways."""

from __future__ import annotations

import asyncio
import gc

import httpx
import pytest
from tiny_checkpoints import build

import prmserve.engine.loop as loop_module
from prmserve import PRM, cli, errors
from prmserve.cli.common import load_prm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build("skywork_prm", tmp_path_factory.mktemp("robust") / "skywork_prm")


@pytest.fixture
def freezes(monkeypatch) -> list[int]:
    """Counts `freeze_heap` calls (without freezing the test process's heap)."""
    calls: list[int] = []
    monkeypatch.setattr(loop_module, "freeze_heap", lambda: calls.append(1))
    return calls


def test_building_and_using_a_prm_leaves_the_callers_heap_alone(checkpoint):
    frozen = gc.get_freeze_count()
    prm = PRM(str(checkpoint), device="cpu", num_kv_blocks=64, block_size=4)
    try:
        prm.score([{"problem": "What is 1+2?", "steps": ["1+2=3."]}])
    finally:
        prm.close()
    # Nothing was frozen (a freeze moves every live object, ~10^5 here); objects an earlier test froze may die meanwhile.
    assert gc.get_freeze_count() <= frozen


def test_the_commands_that_own_the_process_freeze_it_once_loaded(checkpoint, freezes, monkeypatch):
    args = cli.build_parser().parse_args(["demo", str(checkpoint), "--device", "cpu"])
    load_prm(args, args.model).close()
    assert freezes == [1]
    import prmserve.server.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "run_server", lambda prm, settings: served.append(len(freezes)))
    assert cli.main(["serve", str(checkpoint), "--device", "cpu"]) == 0
    assert served == [2]  # frozen before serving


# One error map: each prmserve error class answers with one status, from wherever it is raised ---------


@pytest.fixture(scope="module")
def small_queue_prm(checkpoint):
    prm = PRM(str(checkpoint), device="cpu", num_kv_blocks=8, block_size=4, max_queue=2)
    yield prm
    prm.close()


def post(app, path: str, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


ITEM = {"problem": "What is 1+2?", "steps": ["1+2=3."]}


@pytest.mark.parametrize(("error", "status", "param", "retry"), [
    (errors.InvalidInputError("bad"), 400, "items", False),
    (errors.InputTooLongError("long"), 400, "items", False),
    (errors.FormatError("no such format"), 400, "items", False),
    (errors.HandleNotFoundError("no node"), 404, "handle", False),
    (errors.QueueFullError("busy"), 429, None, True),
    (errors.RequestCancelledError("stopping"), 503, None, True),
    (errors.CheckpointError("broken"), 500, None, False),
])
def test_each_prmserve_error_has_its_status(small_queue_prm, monkeypatch, error, status, param, retry):
    from prmserve.server import create_app

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(small_queue_prm, "plan_score", refuse)
    response = post(create_app(small_queue_prm), "/v1/score", {"items": [ITEM]})
    body = response.json()["error"]
    assert (response.status_code, body["type"], body["code"], body["param"]) == (status, type(error).__name__, status, param)
    assert body["message"].endswith(str(error))
    assert ("Retry-After" in response.headers) == retry


def test_engine_refusals_reach_the_client_with_their_class(small_queue_prm):
    from prmserve.server import create_app

    app = create_app(small_queue_prm)
    too_many = post(app, "/v1/score", {"items": [ITEM] * 3})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "items"
    assert "can never fit the queue of 2" in too_many.json()["error"]["message"]
    long_item = {"problem": ITEM["problem"], "steps": ["1+2=3."] * 20}  # more tokens than the KV pool's 32
    too_long = post(app, "/v1/score", {"items": [ITEM, long_item]})
    error = too_long.json()["error"]
    assert too_long.status_code == 400 and (error["type"], error["param"]) == ("InputTooLongError", "items")
    assert error["message"].startswith("items: item 1: ")


def test_an_empty_token_sequence_is_invalid_not_too_long(small_queue_prm):
    with pytest.raises(errors.InvalidInputError) as refused:
        small_queue_prm.loop.submit([], []).result(timeout=10)
    assert type(refused.value) is errors.InvalidInputError


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ('"timeout": "5"', "timeout", "valid number"),  # strict, like every other field
    ('"timeout": true', "timeout", "valid number"),
    ('"priority": ' + "9" * 3000, "priority", "less than 2147483648"),
    ('"priority": -' + "9" * 5000, "priority", "greater than -2147483648"),  # past Python's 4,300-digit limit
])
def test_lax_or_huge_numbers_get_a_422_naming_the_field(small_queue_prm, extra, param, needle):
    from prmserve.server import create_app

    body = '{"items": [{"problem": "What is 1+2?", "steps": ["1+2=3."]}], ' + extra + "}"

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(small_queue_prm)), base_url="http://test") as client:
            return await client.post("/v1/score", content=body, headers={"content-type": "application/json"})

    response = asyncio.run(go())
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (422, param) and needle in error["message"]


def test_integer_timeouts_are_still_accepted(small_queue_prm):
    from prmserve.server import create_app

    response = post(create_app(small_queue_prm), "/v1/score", {"items": [ITEM], "timeout": 5, "priority": -(2**31) + 1})
    assert response.status_code == 200, response.text


# vLLM's queue time -----------------------------------------------------------------------------------


def test_queue_time_runs_from_creation_to_first_admission(small_queue_prm):
    import time

    from prmserve.engine import Engine, EngineConfig, Request

    engine = Engine(small_queue_prm.model, EngineConfig(num_kv_blocks=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=4))
    first, second = Request("first", list(range(1, 9)), [7]), Request("second", list(range(1, 5)), [3])
    engine.add(first)
    engine.add(second)
    engine.step()  # admits first, computes half of it
    admitted = first.scheduled_at
    time.sleep(0.05)
    engine.step()  # first finishes; second still waits for the one sequence slot
    assert second.scheduled_at is None and first.scheduled_at == admitted  # set once
    engine.step()
    assert 0 <= first.queue_seconds < 0.05 <= second.queue_seconds


def test_queue_time_histogram_in_metrics(small_queue_prm):
    import re

    from prmserve.server import create_app

    app = create_app(small_queue_prm, served_model_names=["tiny"])
    assert post(app, "/v1/score", {"items": [ITEM, ITEM]}).status_code == 200

    async def scrape() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return (await client.get("/metrics")).text

    text = asyncio.run(scrape())

    def sample(name: str) -> float:
        match = re.search(rf'^{re.escape(name)}{{model_name="tiny"}} (\S+)$', text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    assert sample("vllm:request_queue_time_seconds_count") == 2
    assert 0 <= sample("vllm:request_queue_time_seconds_sum") < 5  # two tiny inputs, admitted at once
