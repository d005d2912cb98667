"""Replicas on Ray (CPU, a local cluster of 2 CPUs, the bundled model, 2 replicas): the same results as one engine,
prefix affinity (a problem's items and a node's children on one replica, the cached-token fraction of best-of-16 and
beam workloads within 10% of one engine's), the HTTP app over them, the Serve deployment, sleep and wake, and a
replica killed mid-workload whose requests are retried on the other, none lost."""

from __future__ import annotations

import asyncio
import gc
import socket

import httpx
import pytest

ray = pytest.importorskip("ray")

from prmserve import PRM  # noqa: E402
from prmserve.cli import build_parser  # noqa: E402
from prmserve.cli.serve import _load_replicas  # noqa: E402
from prmserve.ray import RoutedPRM  # noqa: E402
from prmserve.ray.routing import home_of  # noqa: E402
from prmserve.server import create_app  # noqa: E402
from prmserve.server.args import prm_options, server_settings  # noqa: E402

OPTIONS = {"device": "cpu", "dtype": "float32", "kv_cache_gb": 0.05}
PROBLEMS = [f"Sam has {a} apples and buys {b} more. How many apples does Sam have?" for a, b in
            [(3, 4), (5, 9), (12, 7), (8, 8), (21, 5), (6, 13)]]


def best_of_16(problems: list[str]) -> list[dict]:
    """16 solutions per problem, sharing the problem and differing from their first step."""
    return [{"problem": p, "steps": [f"First I take {i} and {i + 1}.", f"So it is {i * 3}.", f"The answer is {i * 3}."]}
            for p in problems for i in range(16)]


def beam(prm: PRM, problems: list[str], width: int = 2, depth: int = 3) -> list:
    """A beam search's calls: each problem's first steps kept, then `width` children per kept node, `depth` levels."""
    results = []
    frontier = prm.score([{"problem": p, "steps": [f"Start {j}."]} for p in problems for j in range(width)], keep=True)
    results += frontier
    for level in range(depth):
        children = []
        for node in frontier:
            children += prm.extend(node.handle, [[f"Level {level} try {k}."] for k in range(width)], keep=True)
        prm.release([n.handle for n in frontier])
        frontier = sorted(children, key=lambda r: r.step_rewards[-1], reverse=True)[: len(problems) * width]
        results += children
    prm.release([n.handle for n in frontier])
    return results


def same(got: list[list[float]], want: list[list[float]]) -> bool:
    """Equal step rewards up to fp32 rounding (a cache hit and a recomputation round alike up to ~1e-11)."""
    return len(got) == len(want) and all(g == pytest.approx(w, abs=1e-6) for g, w in zip(got, want))


def cached_fraction(before, after) -> float:
    return (after.cached_tokens - before.cached_tokens) / (after.prompt_tokens - before.prompt_tokens)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def routed(cluster):
    """2 replicas, built as `prmserve serve --data-parallel-size 2` builds them."""
    args = build_parser().parse_args(["serve", "--data-parallel-size", "2", "--device", "cpu", "--dtype", "float",
                                      "--option", "kv_cache_gb=0.05"])
    prm = _load_replicas(args, prm_options(args), server_settings(args))
    yield prm
    prm.close()


@pytest.fixture(scope="module")
def one():
    prm = PRM(**OPTIONS)
    yield prm
    prm.close()


def test_the_same_results_as_one_engine(routed: RoutedPRM, one: PRM) -> None:
    items = best_of_16(PROBLEMS[:3]) + [{"problem": "1 + 1?", "completion": "1 + 1 = 2.\n\nThe answer is 2."},
                                        {"messages": [{"role": "user", "content": "2 + 2?"},
                                                      {"role": "assistant", "content": "2 + 2 = 4.\n\nSo 4."}]}]
    got, want = routed.score(items, priority=3), one.score(items, priority=3)
    assert [r.usage.prompt_tokens for r in got] == [r.usage.prompt_tokens for r in want]
    for g, w in zip(got, want):
        assert g.step_rewards == pytest.approx(w.step_rewards, abs=1e-6)  # fp32; cache hits round the same up to ~1e-11
        assert g.step_spans == w.step_spans


def test_a_problems_items_and_a_nodes_children_stay_on_one_replica(routed: RoutedPRM) -> None:
    kept = routed.score(best_of_16(PROBLEMS), keep=True)
    homes = {}
    for index, result in enumerate(kept):
        homes.setdefault(PROBLEMS[index // 16], set()).add(home_of(result.handle))
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set.union(*homes.values()) == {0, 1}  # and the problems are spread over both replicas
    node = kept[0]
    children = routed.extend(node.handle, [["Check it."], ["Check again."]], keep=True)
    assert {home_of(c.handle) for c in children} == {home_of(node.handle)}
    assert all(c.usage.cached_tokens >= node.usage.prompt_tokens - 16 for c in children)  # the node's blocks, hit
    routed.release([r.handle for r in kept + children])


@pytest.mark.parametrize("workload", ["best_of_16", "beam"])
def test_the_cached_fraction_is_within_10_percent_of_one_engine(routed: RoutedPRM, one: PRM, workload: str) -> None:
    fractions = []
    for prm in (one, routed):
        prm.reset_prefix_cache()
        before = prm.engine.stats() if prm is one else prm.pool.refresh_stats()
        if workload == "best_of_16":
            for problem in PROBLEMS:  # one call per problem, as a best-of-N loop makes them
                prm.score(best_of_16([problem]))
        else:
            beam(prm, PROBLEMS[:4])
        after = prm.engine.stats() if prm is one else prm.pool.refresh_stats()
        fractions.append(cached_fraction(before, after))
    single, replicas = fractions
    assert single > 0.3 and abs(replicas - single) <= 0.1 * single, fractions


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_the_http_app_serves_the_replicas(routed: RoutedPRM, one: PRM) -> None:
    app = create_app(routed)
    items = best_of_16(PROBLEMS[:1])[:4]
    scored = call(app, "POST", "/v1/score", json={"items": items, "keep": True})
    assert scored.status_code == 200, scored.text
    want = one.score(items)
    for got, expected in zip(scored.json()["results"], want):
        assert got["step_rewards"] == pytest.approx(expected.step_rewards, abs=1e-6)
    handle = scored.json()["results"][0]["handle"]
    extended = call(app, "POST", "/v1/extend", json={"handle": handle, "children": [["Check it."]]})
    assert extended.status_code == 200 and extended.json()["results"][0]["usage"]["cached_tokens"] > 0
    assert call(app, "POST", "/v1/release", json={"handles": [r["handle"] for r in scored.json()["results"]]}).json() == {"released": 4}
    assert call(app, "POST", "/v1/extend", json={"handle": handle, "children": [["x"]]}).status_code == 404
    metrics = call(app, "GET", "/metrics").text
    assert "prmserve_cached_tokens_total" in metrics
    slept = call(app, "POST", "/sleep", params={"level": 1})
    assert slept.status_code == 200 and slept.json()["freed_bytes"] > 0
    assert call(app, "GET", "/is_sleeping").json() == {"is_sleeping": True}
    assert call(app, "POST", "/v1/score", json={"items": items}).status_code == 503
    assert call(app, "POST", "/wake_up").status_code == 200
    again = call(app, "POST", "/v1/score", json={"items": items}).json()["results"]
    assert same([r["step_rewards"] for r in again], [r.step_rewards for r in want])


def test_an_actor_for_rl_loops(routed: RoutedPRM, one: PRM) -> None:
    """The replicas are `PRMActor`s: one used directly, as an RL loop holds it (its own handles, sleep and wake)."""
    actor = routed.pool.replicas[1]
    # The actor owns its process: its loaded heap is frozen, as the commands freeze theirs (tests/test_robustness.py).
    assert ray.get(actor.__ray_call__.remote(lambda _: gc.get_freeze_count())) > 10_000
    items = best_of_16(PROBLEMS[:1])[:2]
    kept = ray.get(actor.score.remote(items, keep=True))
    assert same([r.step_rewards for r in kept], [r.step_rewards for r in one.score(items)])
    child = ray.get(actor.extend.remote(kept[0].handle, [["Check it."]]))[0]
    assert child.usage.cached_tokens > 0 and len(child.step_rewards) == 4
    report = ray.get(actor.sleep.remote(2))
    assert report.level == 2 and report.freed_bytes > 0 and ray.get(actor.is_sleeping.remote())
    ray.get(actor.wake_up.remote())
    assert ray.get(actor.release.remote([r.handle for r in kept])) == 2
    assert same([r.step_rewards for r in ray.get(actor.score.remote(items))], [r.step_rewards for r in kept])


def test_the_serve_deployment(cluster, one: PRM) -> None:
    from ray import serve

    from prmserve.ray import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # the HTTP API at the app's route prefix too
    try:
        handle = serve.run(build_app(None, 1, **OPTIONS), name="prm", route_prefix="/prm")
        items = best_of_16(PROBLEMS[:1])[:2]
        want = [r.step_rewards for r in one.score(items)]
        kept = handle.score.remote(items, keep=True).result()
        assert same([r.step_rewards for r in kept], want)
        assert len(handle.extend.remote(kept[0].handle, [["Check it."]]).result()[0].step_rewards) == 4
        over_http = httpx.post(f"http://127.0.0.1:{port}/prm/v1/score", json={"items": items}, timeout=30)
        assert same([r["step_rewards"] for r in over_http.json()["results"]], want)
    finally:
        serve.shutdown()


def test_a_killed_replica_has_its_requests_retried_on_the_other(routed: RoutedPRM, one: PRM) -> None:
    """Last in the module: the replica stays dead."""
    kept = routed.score(best_of_16(PROBLEMS), keep=True)
    victim = home_of(kept[0].handle)
    items = best_of_16(PROBLEMS) * 4
    jobs = routed.plan_score(items)
    futures = routed.submit_jobs(jobs)
    ray.kill(routed.pool.replicas[victim])
    results = routed.collect(jobs, [f.result(timeout=60) for f in futures])
    assert routed.pool.retried > 0 and routed.pool.alive == {1 - victim}
    want = one.score(items)
    assert len(results) == len(items)
    for got, expected in zip(results, want):
        assert got.step_rewards == pytest.approx(expected.step_rewards, abs=1e-6)
    # A node kept on the dead replica still extends (on the live one, its prefix computed again).
    child = routed.extend(kept[0].handle, [["Check it."]])[0]
    whole = one.score([{**best_of_16(PROBLEMS[:1])[0], "steps": best_of_16(PROBLEMS[:1])[0]["steps"] + ["Check it."]}])[0]
    assert child.step_rewards == pytest.approx(whole.step_rewards, abs=1e-6)
