"""`prmserve.Client` / `AsyncClient` against a real server: offline-identical results, typed errors, retries, batches split."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Iterator

import pytest

from conftest import API_KEY, ServerProcess
from prmserve import AsyncClient, Client, InvalidInputError, QueueFullError, RequestCancelledError, ScoreResult
from prmserve.client import AuthenticationError, ClientTimeoutError, ConnectionFailedError
from test_server import long_item, send_raw_and_hold, short_items, wait_until


def test_score_returns_the_offline_results(server: ServerProcess, offline_prm) -> None:
    items = short_items(20, seed=42)
    with Client(server.url) as client:
        results = client.score(items)
    want = offline_prm.score(items)
    assert all(isinstance(r, ScoreResult) for r in results)
    for got, expected in zip(results, want):
        assert got.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)
        assert got.usage.prompt_tokens == expected.usage.prompt_tokens
        assert got.aggregate("last") == got.step_rewards[-1]


def test_async_client_scores_concurrently(server: ServerProcess, offline_prm) -> None:
    batches = [short_items(3, seed=s) for s in range(10)]

    async def run() -> list[list[ScoreResult]]:
        async with AsyncClient(server.url) as client:
            assert (await client.models())[0]["id"] == offline_prm.model_name
            return await asyncio.gather(*(client.score(b, priority=random.randint(0, 3)) for b in batches))

    for got, items in zip(asyncio.run(run()), batches):
        want = offline_prm.score(items)
        for result, expected in zip(got, want):
            assert result.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)


def test_server_errors_become_typed_errors_with_the_servers_message(server: ServerProcess, slow_server: ServerProcess) -> None:
    with Client(server.url) as client:
        with pytest.raises(InvalidInputError, match="item 1: step 0 is empty"):
            client.score([{"problem": "p", "steps": ["ok"]}, {"problem": "p", "steps": [""]}])
        with pytest.raises(InvalidInputError, match="items.0.steps"):
            client.score([{"problem": "p", "steps": 3}])
        with pytest.raises(InvalidInputError):
            client.score({"problem": "p", "steps": ["a"]})  # one item, not a list
    with Client(slow_server.url) as client:
        assert client.health()["status"] == "ok"
        with pytest.raises(AuthenticationError):
            client.score(short_items(1))


def test_full_queue_is_retried_until_it_has_room(slow_server: ServerProcess) -> None:
    """A queue of 4 holding 3 long items refuses 2 more (429) until the first finishes; the client waits and gets in."""
    def refusals() -> float:
        return slow_server.metric('prmserve_errors_total{route="/v1/score",status="429"}', default=0.0)

    before = refusals()
    sock = send_raw_and_hold(slow_server.url, json.dumps({"items": [long_item(s) for s in (50, 51, 52)]}).encode())
    try:
        wait_until(lambda: slow_server.pending() == 3, what="3 items queued")
        with Client(slow_server.url, api_key=API_KEY) as client:
            results = client.score(short_items(2, seed=9))
        assert len(results) == 2 and refusals() > before
    finally:
        sock.close()
    with Client(slow_server.url, api_key=API_KEY, max_retries=0) as client:
        sock = send_raw_and_hold(slow_server.url, json.dumps({"items": [long_item(s) for s in (53, 54, 55, 56)]}).encode())
        try:
            wait_until(lambda: slow_server.pending() == 4, what="a full queue")
            with pytest.raises(QueueFullError, match="busy"):
                client.score(short_items(1))
        finally:
            sock.close()
    wait_until(lambda: slow_server.pending() == 0, what="the queue to empty")


def assert_offline_results(results: list[ScoreResult], items: list[dict], offline_prm) -> None:
    want = offline_prm.score(items)
    assert len(results) == len(want)
    for got, expected in zip(results, want):
        assert got.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)


def test_a_batch_larger_than_the_servers_queue_is_sent_in_parts(slow_server: ServerProcess, offline_prm) -> None:
    """The slow server queues at most 4 items: 10 in one request can never fit, 10 in requests of 4 are scored in order."""
    items = short_items(10, seed=5)
    with Client(slow_server.url, api_key=API_KEY, max_batch_items=256) as client:
        with pytest.raises(InvalidInputError, match="never fit"):
            client.score(items)
    with Client(slow_server.url, api_key=API_KEY, max_batch_items=4) as client:
        assert_offline_results(client.score(items), items, offline_prm)

    async def run() -> list[ScoreResult]:
        async with AsyncClient(slow_server.url, api_key=API_KEY, max_batch_items=3) as client:
            return await client.score(items)

    assert_offline_results(asyncio.run(run()), items, offline_prm)


def test_a_bad_item_in_a_split_batch_names_its_request(server: ServerProcess) -> None:
    items = short_items(5, seed=1)
    items[3] = {"problem": "p", "steps": [""]}
    with Client(server.url, max_batch_items=2) as client:
        with pytest.raises(InvalidInputError, match=r"request of items 2\.\.3 of 5 .*item 1: step 0 is empty"):
            client.score(items)
    with pytest.raises(ValueError, match="max_batch_items"):
        Client(server.url, max_batch_items=0)


@pytest.fixture
def refused_url() -> str:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_server_is_a_prmserve_error_naming_its_url(refused_url: str) -> None:
    with Client(refused_url) as client:
        with pytest.raises(ConnectionFailedError, match=f"cannot reach the prmserve server at {refused_url}: .*refused"):
            client.score(short_items(1))

    async def run() -> None:
        async with AsyncClient(refused_url) as client:
            await client.health()

    with pytest.raises(ConnectionFailedError, match=refused_url):
        asyncio.run(run())


def test_a_server_that_does_not_answer_in_time_is_a_timeout_error(silent_url: str) -> None:
    with Client(silent_url, timeout=0.2) as client:
        with pytest.raises(ClientTimeoutError, match=f"the prmserve server at {silent_url} did not answer in time"):
            client.score(short_items(1))

    async def run() -> None:
        async with AsyncClient(silent_url, timeout=0.2) as client:
            await client.score(short_items(1))

    with pytest.raises(RequestCancelledError, match=silent_url):  # a timeout drops the request, like the server's 504
        asyncio.run(run())


def test_node_api_through_the_clients(server, offline_prm) -> None:
    """keep / extend / release: the same rewards as the offline API, handles that expire into a typed error."""
    from prmserve import HandleNotFoundError

    problem, node, children = "Tom has 3 apples and buys 2 more. How many?", ["3 + 2 = 5."], [["The answer is 5."], ["So 6."]]
    want = offline_prm.score([{"problem": problem, "steps": node + c} for c in children])
    with Client(server.url, max_batch_items=1) as client:  # children split over two round trips
        handle = client.score([{"problem": problem, "steps": node}], keep=True)[0].handle
        kids = client.extend(handle, children, keep=True)
        for kid, expected in zip(kids, want, strict=True):
            assert kid.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)
        assert all(k.handle for k in kids)
        assert client.release([handle, kids[0].handle, kids[1].handle]) == 3
        with pytest.raises(HandleNotFoundError):
            client.extend(handle, children)

    async def run() -> list[ScoreResult]:
        async with AsyncClient(server.url) as client:
            kept = (await client.score([{"problem": problem, "steps": node}], keep=True))[0].handle
            result = await client.extend(kept, children)
            assert await client.release(kept) == 1
            return result

    for got, expected in zip(asyncio.run(run()), want, strict=True):
        assert got.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)
