"""A real `prmserve serve` process: exact answers under concurrency, and every refusal a service owes its users."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOLERANCE = 1e-6


def short_items(count: int, seed: int = 0) -> list[dict]:
    """Varied small arithmetic solutions (1-4 steps), some sharing a problem so the prefix cache is used."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        a, b = rng.randint(1, 30), rng.randint(1, 9)
        steps = [f"{a} + {b} = {a + b}", f"{a + b} * 2 = {2 * (a + b)}", "so the answer is done", f"check {a}"]
        items.append({"problem": f"What is ({a} + {b}) * 2?", "steps": steps[: rng.randint(1, 4)]})
    return items


def long_item(seed: int, digits: int = 1500) -> dict:
    """An item of about 2 tokens per digit: with 16 tokens a step it keeps the engine busy for a while."""
    rng = random.Random(seed)
    return {"problem": " ".join(str(rng.randint(0, 9)) for _ in range(digits)), "steps": ["so it is"]}


def wait_until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(g - w) for g, w in zip(got, want)) <= TOLERANCE, (got, want)


# Correctness under load -----------------------------------------------------------------------


def test_300_concurrent_requests_with_mixed_priorities_get_offline_rewards(server: ServerProcess, offline_prm) -> None:
    rng = random.Random(1)
    bodies = [{"items": short_items(rng.randint(1, 3), seed=i), "priority": rng.randint(-2, 2)} for i in range(300)]

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 300
    expected = offline_prm.score([item for body in bodies for item in body["items"]])
    got = [result for r in responses for result in r.json()["results"]]
    assert len(got) == len(expected)
    for result, want in zip(got, expected):
        assert_close(result["step_rewards"], want.step_rewards)
        assert result["aggregate"] == min(result["step_rewards"])
        usage = result["usage"]
        assert usage["prompt_tokens"] == want.usage.prompt_tokens
        assert usage["computed_tokens"] + usage["cached_tokens"] == want.usage.computed_tokens + want.usage.cached_tokens


def test_aggregate_and_request_usage(server: ServerProcess, offline_prm) -> None:
    items = short_items(3, seed=7)
    body = httpx.post(server.url + "/v1/score", json={"items": items, "aggregate": "mean"}).json()
    for result in body["results"]:
        assert result["aggregate"] == pytest.approx(sum(result["step_rewards"]) / len(result["step_rewards"]))
    assert body["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in body["results"])


def test_preformatted_text_and_token_ids_score_like_problem_and_steps(server: ServerProcess, offline_prm) -> None:
    item = short_items(1, seed=3)[0]
    encoded = offline_prm.encode(item)
    text = offline_prm.tokenizer.decode(encoded.token_ids)
    body = {"items": [item, {"text": text}, {"token_ids": encoded.token_ids}]}
    results = httpx.post(server.url + "/v1/score", json=body).json()["results"]
    want = offline_prm.score([item])[0].step_rewards
    for result in results:
        assert_close(result["step_rewards"], want)


# vLLM-compatible /pooling -----------------------------------------------------------------------


def test_pooling_rows_are_one_minus_reward_and_reward(server: ServerProcess, offline_prm) -> None:
    items = short_items(2, seed=11)
    texts = [offline_prm.tokenizer.decode(offline_prm.encode(item).token_ids) for item in items]
    ids = offline_prm.encode(items[0]).token_ids
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    want = [r.step_rewards for r in offline_prm.score(items)]
    cases = [
        ({"input": texts[0]}, [want[0]]),
        ({"input": texts}, want),
        ({"input": ids}, [want[0]]),
        ({"input": [ids, offline_prm.encode(items[1]).token_ids]}, want),
    ]
    for request, rewards in cases:
        response = httpx.post(server.url + "/pooling", json={"model": model, "task": "token_classify", **request})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == model
        assert [d["index"] for d in body["data"]] == list(range(len(rewards)))
        for data, reward in zip(body["data"], rewards):
            assert data["object"] == "pooling"
            assert_close([row[1] for row in data["data"]], reward)
            assert_close([row[0] for row in data["data"]], [1 - r for r in reward])
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_pooling_chat_messages_use_the_chat_template(server: ServerProcess, offline_prm) -> None:
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "2 + 3 = 5<extra_0>"}, {"type": "text", "text": "done<extra_0>"}]},
    ]
    response = httpx.post(server.url + "/pooling", json={"messages": messages})
    assert response.status_code == 200, response.text
    want = offline_prm.score([{"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5", "done"]}])[0].step_rewards
    assert_close([row[1] for row in response.json()["data"][0]["data"]], want)


def test_pooling_refuses_another_model_and_ambiguous_input(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/pooling", json={"model": "someone/else", "input": "x<extra_0>"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    response = httpx.post(server.url + "/pooling", json={"input": "x<extra_0>", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 422 and "exactly one of 'input' or 'messages'" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/pooling", json={"input": "no separator here"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


# Bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"problem": "p", "steps": "not a list"}]}, "items.0.steps"),
        ({"items": []}, "items"),
        ({"items": [{"problem": "p", "steps": ["s"]}], "aggregate": "max"}, "aggregate"),
        ({"items": [{"problem": "p", "steps": ["s"]}], "priority": "high"}, "priority"),
        ({"items": [{"problem": "p", "steps": ["s"]}], "timeout": -1}, "timeout"),
        ({"items": [{"problem": "p", "step": ["s"]}]}, "items.0.step"),
        ({"items": [{"problem": "p", "steps": ["s"]}, {"token_ids": ["a"]}]}, "items.1.token_ids.0"),
    ],
)
def test_malformed_bodies_get_422_naming_the_field(server: ServerProcess, body: dict, field: str) -> None:
    response = httpx.post(server.url + "/v1/score", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(field)


def test_invalid_json_is_422(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_unscorable_item_gets_400_naming_its_index(server: ServerProcess) -> None:
    items = [{"problem": "p", "steps": ["fine"]}, {"problem": "p", "steps": ["a", "  "]}]
    response = httpx.post(server.url + "/v1/score", json={"items": items})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "InvalidInputError" and "item 1: step 1 is empty" in error["message"]


def test_oversized_body_is_413_by_length_and_by_stream(server: ServerProcess) -> None:
    big = {"items": [{"problem": "x" * 70_000, "steps": ["s"]}]}
    response = httpx.post(server.url + "/v1/score", json=big)
    assert response.status_code == 413

    def chunks():  # no Content-Length: only counting the streamed bytes can catch it
        yield b'{"items": [{"problem": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'", "steps": ["s"]}]}'

    response = httpx.post(server.url + "/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "65536" in response.json()["error"]["message"]


# Service endpoints ---------------------------------------------------------------------------------


def test_models_health_docs(server: ServerProcess, qwen_prm_dir: Path) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == str(qwen_prm_dir)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/v1/score" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_metrics_count_tokens_steps_latency_and_errors(server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/score", json={"items": short_items(2, seed=5)})
    httpx.post(server.url + "/v1/score", json={"items": []})
    text = httpx.get(server.url + "/metrics").text
    # Qwen2.5-Math-PRM's <|im_end|> and newline after the last step are counted as prompt, never computed.
    assert server.metric("prmserve_prompt_tokens_total") > (
        server.metric("prmserve_computed_tokens_total") + server.metric("prmserve_cached_tokens_total")
    ) > 0
    assert server.metric("prmserve_step_sequences_count") > 0 and server.metric("prmserve_step_tokens_sum") > 0
    assert server.metric("prmserve_requests_pending") == 0
    assert 'prmserve_request_seconds_count{route="/v1/score"}' in text
    assert 'prmserve_errors_total{route="/v1/score",status="422"}' in text


# Load and failure: the slow server (16 tokens a step, queue of 4, API key) ---------------------------


def test_api_key_is_required_except_for_health(slow_server: ServerProcess) -> None:
    body = {"items": short_items(1)}
    assert httpx.post(slow_server.url + "/v1/score", json=body).status_code == 401
    wrong = httpx.post(slow_server.url + "/v1/score", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    assert httpx.get(slow_server.url + "/v1/models").status_code == 401
    assert httpx.post(slow_server.url + "/v1/score", json=body, headers=AUTH).status_code == 200
    assert httpx.get(slow_server.url + "/health").status_code == 200


def send_raw_and_hold(url: str, body: bytes, path: str = "/v1/score") -> socket.socket:
    """Send a request over a bare socket and return it unread, so the test decides when the client leaves."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def test_full_queue_gets_429_then_a_disconnect_drops_the_queued_work(slow_server: ServerProcess) -> None:
    import json

    items = [long_item(seed) for seed in range(4)]
    computed_before = slow_server.metric("prmserve_computed_tokens_total")
    sock = send_raw_and_hold(slow_server.url, json.dumps({"items": items}).encode())
    try:
        wait_until(lambda: slow_server.pending() == 4, what="the 4 items to be queued")
        refused = httpx.post(slow_server.url + "/v1/score", json={"items": short_items(1)}, headers=AUTH)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "QueueFullError"
    finally:
        sock.close()
    started = time.monotonic()
    wait_until(lambda: slow_server.pending() == 0, what="the disconnected client's work to be dropped")
    assert time.monotonic() - started < 1.0  # scoring all four would take over 2 s
    assert slow_server.metric("prmserve_requests_waiting") == slow_server.metric("prmserve_requests_running") == 0
    assert 'status="499"' in httpx.get(slow_server.url + "/metrics").text
    assert slow_server.metric("prmserve_computed_tokens_total") == computed_before  # no item finished


def test_multi_item_request_is_admitted_whole_or_not_at_all(slow_server: ServerProcess) -> None:
    import json

    sock = send_raw_and_hold(slow_server.url, json.dumps({"items": [long_item(s) for s in (10, 11, 12)]}).encode())
    try:
        wait_until(lambda: slow_server.pending() == 3, what="3 items queued")
        refused = httpx.post(slow_server.url + "/v1/score", json={"items": short_items(2)}, headers=AUTH)
        assert refused.status_code == 429
        wait_until(lambda: slow_server.pending() == 3, what="the partly admitted request to be withdrawn")
        too_many = httpx.post(slow_server.url + "/v1/score", json={"items": short_items(5)}, headers=AUTH)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "items"
    finally:
        sock.close()
    wait_until(lambda: slow_server.pending() == 0, what="the queue to empty")


def test_timeout_is_504_and_drops_the_work(slow_server: ServerProcess) -> None:
    computed_before = slow_server.metric("prmserve_computed_tokens_total")
    started = time.monotonic()
    body = {"items": [long_item(seed) for seed in range(20, 24)], "timeout": 0.3}
    response = httpx.post(slow_server.url + "/v1/score", json=body, headers=AUTH)
    assert response.status_code == 504 and response.json()["error"]["param"] == "timeout"
    assert time.monotonic() - started < 1.5
    wait_until(lambda: slow_server.pending() == 0, timeout=1.0, what="the timed-out work to be dropped")
    assert slow_server.metric("prmserve_requests_running") == 0
    assert slow_server.metric("prmserve_computed_tokens_total") == computed_before


# Shutdown ------------------------------------------------------------------------------------------


def test_sigterm_stops_accepting_and_drains_in_flight_work(qwen_prm_dir: Path, tmp_path: Path, offline_prm) -> None:
    server = ServerProcess(qwen_prm_dir, tmp_path, "--max-num-batched-tokens", "16", "--no-prefix-caching").wait_ready()
    try:
        items = [long_item(seed, digits=700) for seed in range(30, 36)]
        with ThreadPoolExecutor(len(items)) as pool:
            futures = [pool.submit(httpx.post, server.url + "/v1/score", json={"items": [it]}, timeout=30) for it in items]
            wait_until(lambda: server.pending() == len(items), what="all requests queued")
            server.proc.terminate()
            refused = threading.Event()

            def new_connections_refused() -> bool:
                try:
                    httpx.get(server.url + "/health", timeout=0.5)
                except httpx.TransportError:
                    refused.set()
                return refused.is_set()

            wait_until(new_connections_refused, timeout=3.0, what="the listener to close")
            responses = [f.result() for f in futures]
        assert server.proc.wait(15) == 0, server.log()
        assert [r.status_code for r in responses] == [200] * len(items)
        for response, want in zip(responses, offline_prm.score(items)):
            assert_close(response.json()["results"][0]["step_rewards"], want.step_rewards)
    finally:
        server.stop()



def test_app_observes_engine_steps_only_while_it_serves(qwen_prm_dir: Path) -> None:
    from prmserve import PRM
    from prmserve.server import create_app

    prm = PRM(str(qwen_prm_dir), device="cpu", dtype="float32")
    app = create_app(prm)
    assert prm.engine.step_observers == []

    async def serve_once() -> int:
        async with app.router.lifespan_context(app):
            assert len(prm.engine.step_observers) == 1
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
                response = await client.post("/v1/score", json={"items": short_items(2)})
                assert response.status_code == 200
                metrics = (await client.get("/metrics")).text
        return int(float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("prmserve_step_sequences_count"))))

    assert asyncio.run(serve_once()) > 0
    assert prm.engine.step_observers == []  # shutdown closed the PRM and let go of the engine
