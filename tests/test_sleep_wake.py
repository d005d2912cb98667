"""Sleep mode (vLLM's `sleep(level)` / `wake_up()`): memory given back, work refused meanwhile, in-flight work
finished first, results and node handles intact after waking; the same over HTTP (/sleep, /wake_up, /is_sleeping)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from prmserve import PRM
from prmserve.client import AsyncClient
from prmserve.engine.model_runner import ModelRunner
from prmserve.errors import EngineSleepingError, InvalidInputError
from prmserve.server import create_app

PROBLEM = "Tom has 3 apples and buys 2 more. Then he doubles them. How many?"
ITEMS = [
    {"problem": PROBLEM, "steps": ["3 + 2 = 5 apples.", "5 * 2 = 10.", "The answer is 10."]},
    {"problem": PROBLEM, "steps": ["3 + 2 = 6 apples.", "6 * 2 = 12."]},
    {"problem": "What is 7 - 4?", "steps": ["7 - 4 = 3.", "The answer is 3."]},
]


@pytest.fixture(scope="module")
def prm(qwen_prm_dir):
    model = PRM(str(qwen_prm_dir), device="cpu", dtype="float32", kv_cache_gb=0.01)
    yield model
    model.close()


def pool_bytes(prm: PRM) -> int:
    blocks = prm.engine.blocks
    return blocks.num_blocks * ModelRunner.bytes_per_block(prm.model, blocks.block_size, prm.dtype)


def weight_bytes(prm: PRM) -> int:
    return sum(p.numel() * p.element_size() for p in prm.model.parameters())


@pytest.mark.parametrize("level", [1, 2])
def test_round_trip_gives_identical_results(prm: PRM, level: int) -> None:
    before = prm.score(ITEMS)
    kv, weights = pool_bytes(prm), weight_bytes(prm)
    report = prm.sleep(level=level)
    assert prm.is_sleeping and prm.engine.sleep_level == level
    # On CPU the memory returned is the KV pool's bytes, and at level 2 the weights' too (dropped, not moved).
    assert report.level == level
    assert report.freed_bytes == kv + (weights if level == 2 else 0)
    assert not hasattr(prm.engine, "runner")  # the KV and head-output pools are gone
    if level == 2:
        assert weight_bytes(prm) == 0
    with pytest.raises(EngineSleepingError, match="asleep"):
        prm.score(ITEMS)
    prm.wake_up()
    assert not prm.is_sleeping and weight_bytes(prm) == weights
    after = prm.score(ITEMS)
    assert [r.step_rewards for r in after] == [r.step_rewards for r in before]
    # The prefix cache went with the pool: the first call after waking computes everything again.
    assert after[0].usage.cached_tokens == 0 < before[0].usage.prompt_tokens == after[0].usage.prompt_tokens


def test_sleeping_twice_and_waking_twice_do_nothing(prm: PRM) -> None:
    prm.sleep(1)
    assert prm.sleep(1).freed_bytes == 0
    prm.wake_up()
    prm.wake_up()
    assert not prm.is_sleeping and len(prm.score(ITEMS[:1])[0].step_rewards) == 3


def test_a_bad_level_is_refused_and_the_engine_stays_awake(prm: PRM) -> None:
    with pytest.raises(InvalidInputError, match="level must be 1 or 2"):
        prm.sleep(level=3)
    assert not prm.is_sleeping and prm.score(ITEMS[:1])


def test_node_handles_survive_a_sleep(prm: PRM) -> None:
    kept = prm.score(ITEMS[:1], keep=True)[0]
    prm.sleep(1)
    prm.wake_up()
    child = prm.extend(kept.handle, [["Check: 10 = 10."]])[0]
    whole = prm.score([{"problem": PROBLEM, "steps": ITEMS[0]["steps"] + ["Check: 10 = 10."]}])[0]
    assert child.step_rewards == pytest.approx(whole.step_rewards, abs=1e-6)
    assert prm.release(kept.handle) == 1


def test_work_in_flight_finishes_before_the_engine_sleeps(qwen_prm_dir) -> None:
    slow = PRM(str(qwen_prm_dir), device="cpu", dtype="float32", kv_cache_gb=0.01, max_num_batched_tokens=16)
    try:
        want = slow.score(ITEMS)
        items = [dict(item, steps=item["steps"] + [f"Step {i}."]) for i in range(12) for item in ITEMS]
        jobs = slow.plan_score(items)
        futures = slow.submit_jobs(jobs)
        asleep = threading.Event()
        sleeper = threading.Thread(target=lambda: (slow.sleep(1), asleep.set()))
        sleeper.start()
        while not slow.is_sleeping:  # the refusal starts at once, while the queue still drains
            pass
        with pytest.raises(EngineSleepingError):
            slow.score(ITEMS)
        finished = [f.result(timeout=60) for f in futures]
        sleeper.join(60)
        assert asleep.is_set() and len(finished) == len(items)
        results = slow.collect(jobs, finished)
        slow.wake_up()
        assert [r.step_rewards for r in results] == [r.step_rewards for r in slow.score(items)]
        assert [r.step_rewards for r in slow.score(ITEMS)] == [r.step_rewards for r in want]
    finally:
        slow.close()


# Over HTTP ---------------------------------------------------------------------------------------------------


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_routes_sleep_refuse_work_and_wake(prm: PRM) -> None:
    app = create_app(prm)
    want = call(app, "POST", "/v1/score", json={"items": ITEMS}).json()["results"]
    assert call(app, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    slept = call(app, "POST", "/sleep", params={"level": 1})
    assert slept.status_code == 200, slept.text
    assert slept.json()["freed_bytes"] == pool_bytes(prm) and slept.json()["measured_by"] == "KV pool bytes"
    assert call(app, "GET", "/is_sleeping").json() == {"is_sleeping": True}
    refused = call(app, "POST", "/v1/score", json={"items": ITEMS})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "EngineSleepingError" and "wake_up" in refused.json()["error"]["message"]
    assert call(app, "POST", "/wake_up").status_code == 200
    assert call(app, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    got = call(app, "POST", "/v1/score", json={"items": ITEMS}).json()["results"]
    assert [r["step_rewards"] for r in got] == [r["step_rewards"] for r in want]


@pytest.mark.parametrize("level", ["3", "0", "one"])
def test_a_bad_level_over_http_is_a_422_naming_it(prm: PRM, level: str) -> None:
    response = call(create_app(prm), "POST", "/sleep", params={"level": level})
    assert response.status_code == 422 and response.json()["error"]["param"] == "query.level"
    assert not prm.is_sleeping


def test_the_client_waits_through_a_sleep_by_retrying_503(prm: PRM) -> None:
    app = create_app(prm)

    async def go() -> tuple[list, dict]:
        client = AsyncClient("http://test")
        client._http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
        async with client:
            report = await client.sleep(level=2)
            assert await client.is_sleeping()
            scoring = asyncio.ensure_future(client.score(ITEMS))  # 503s, retried with backoff
            await asyncio.sleep(0.3)
            assert not scoring.done()
            await client.wake_up()
            return await scoring, report

    results, report = asyncio.run(go())
    assert report["level"] == 2 and report["freed_bytes"] > pool_bytes(prm)
    assert [r.step_rewards for r in results] == [r.step_rewards for r in prm.score(ITEMS)]
