"""Bounded load and faults on the loopback server: 300 concurrent mixed-priority clients a wave, 10 waves
(3,000 requests), a tenth of them leaving mid-request; every other client gets its own item's rewards
or a typed error, each wave is bounded in time, and the server's RSS stays roughly flat."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess

CLIENTS = 300  # per wave: a few hundred, not 1,024 (CI has 2 cores)
WAVES = 10
LEAVING = 0.1  # the share of clients that disconnect mid-request
WAVE_LIMIT_S = 60.0
RSS_GROWTH_LIMIT_KB = 50 * 1024


def _items() -> list[dict]:
    """Distinct items (so a misrouted answer shows): different problems, step counts and steps."""
    return [
        {"problem": f"What is {a} + {b}?", "steps": [f"{a} + {b} = {a + b + wrong}"] + ["So the answer is that."] * (a % 3)}
        for a in range(1, 9) for b, wrong in ((2, 0), (3, 1), (5, 0), (7, 2))
    ]


def _rss_kb(pid: int) -> int:
    """The process's resident set (VmRSS) in kB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


async def _client(http: httpx.AsyncClient, rng: random.Random, index: int, item: dict) -> tuple[str, int, object]:
    """One client: ("left", ...) when it disconnected on purpose, else ("answer", status, body)."""
    body = {"items": [item], "priority": rng.choice((-5, 0, 0, 3)), "aggregate": "min"}
    if rng.random() < LEAVING:
        try:
            await asyncio.wait_for(http.post("/v1/score", json=body), timeout=rng.uniform(0.001, 0.05))
        except TimeoutError:
            return "left", index, None
    response = await http.post("/v1/score", json=body)
    return "answer", response.status_code, response.json()


async def _wave(url: str, items: list[dict], seed: int) -> list[tuple[int, tuple[str, int, object]]]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=WAVE_LIMIT_S) as http:
        picks = [rng.randrange(len(items)) for _ in range(CLIENTS)]
        outcomes = await asyncio.gather(*(_client(http, rng, i, items[k]) for i, k in enumerate(picks)))
    return list(zip(picks, outcomes))


def test_concurrent_mixed_priority_clients_lose_nothing_misroute_nothing_and_rss_stays_flat(
    server: ServerProcess, offline_prm
) -> None:
    items = _items()
    want = [r.step_rewards for r in offline_prm.score(items)]
    assert len({tuple(round(x, 6) for x in w) for w in want}) == len(want), "items must be told apart by their rewards"
    rss, answered, left, typed_errors = [], 0, 0, []
    for wave in range(WAVES):
        started = time.monotonic()
        outcomes = asyncio.run(_wave(server.url, items, seed=wave))
        assert time.monotonic() - started < WAVE_LIMIT_S
        assert len(outcomes) == CLIENTS  # none lost: every client returned an outcome
        for k, (kind, status, body) in outcomes:
            if kind == "left":
                left += 1
            elif status == 200:
                answered += 1
                got = body["results"][0]["step_rewards"]
                assert got == pytest.approx(want[k], abs=1e-5), f"item {k} got another item's rewards: {got} != {want[k]}"
            else:
                assert status < 500 or status in (503, 504), (status, body)
                assert body["error"]["type"], body  # a typed error
                typed_errors.append((status, body["error"]["type"]))
        rss.append(_rss_kb(server.proc.pid))
    deadline = time.monotonic() + 10
    while server.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.pending() == 0  # nothing left behind by the clients that went away
    assert answered + left + len(typed_errors) == CLIENTS * WAVES and left > 0
    assert answered >= 0.8 * CLIENTS * WAVES, typed_errors[:10]
    first, last = rss[1000 // CLIENTS], rss[-1]  # after the first thousand requests, after the last
    assert last - first < RSS_GROWTH_LIMIT_KB, f"RSS grew from {first} to {last} kB over the waves: {rss}"
