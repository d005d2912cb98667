"""Work before refusal: cheap checks come before tokenising, which runs off the event loop; the API key is
checked before a body is read; the OpenAPI schema declares what each route can answer."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from conftest import API_KEY, ServerProcess
from prmserve.prm import PRM
from prmserve.server import create_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def items(count: int, start: int = 0) -> list[dict]:
    """Distinct items (no two share a problem, so none is served from the recent encodings)."""
    return [{"problem": f"What is {i} + {i % 7}? " + " ".join(str(i * j % 10) for j in range(20)), "steps": [f"{i} + {i % 7}", "so"]}
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def prm(qwen_prm_dir):
    prm = PRM(str(qwen_prm_dir), device="cpu", dtype="float32", max_queue=100_000)
    yield prm
    prm.close()


def count_encodes(prm: PRM, monkeypatch) -> list[int]:
    """Counts the items the format tokenises whole: one per `encode` call, one per item of an `encode_many` batch
    (a Qwen PRM's batch does not go through `encode`)."""
    calls: list[int] = []
    encode, encode_many = prm.format.encode, prm.format.encode_many

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    def counted_many(items):
        calls.extend(1 for _ in items)
        return encode_many(items)

    monkeypatch.setattr(prm.format, "encode", counted)
    monkeypatch.setattr(prm.format, "encode_many", counted_many)
    return calls


@pytest.fixture
def encodes(prm: PRM, monkeypatch) -> list[int]:
    return count_encodes(prm, monkeypatch)


def post(app, path: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, float]:
    """The response and the seconds it took."""
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.post(path, json=body, headers=headers)

    started = time.perf_counter()
    response = asyncio.run(go())
    return response, time.perf_counter() - started


# Cheap refusals before tokenising -----------------------------------------------------------------


def test_more_items_than_the_cap_get_400_fast_without_tokenising(prm: PRM, encodes: list[int]) -> None:
    response, seconds = post(create_app(prm), "/v1/score", {"items": items(5000)})
    error = response.json()["error"]
    assert response.status_code == 400 and (error["type"], error["param"]) == ("InvalidInputError", "items")
    assert "5000 items in one request; this server takes at most 4096" in error["message"]
    assert seconds < 0.5 and encodes == []
    response, _ = post(create_app(prm, max_items_per_request=2), "/v1/score", {"items": items(2)})
    assert response.status_code == 200 and len(encodes) == 2


def test_more_items_than_the_queue_holds_or_has_room_for_are_refused_without_tokenising(qwen_prm_dir, monkeypatch) -> None:
    small = PRM(str(qwen_prm_dir), device="cpu", dtype="float32", max_queue=4)
    try:
        encodes = count_encodes(small, monkeypatch)
        never, _ = post(create_app(small), "/v1/score", {"items": items(5)})
        assert never.status_code == 400 and never.json()["error"]["param"] == "items"
        assert "can never fit the queue of 4" in never.json()["error"]["message"]
        monkeypatch.setattr(PRM, "num_pending", property(lambda self: 3))
        busy, _ = post(create_app(small), "/v1/score", {"items": items(2)})
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "QueueFullError" and busy.headers["Retry-After"] == "1"
        assert encodes == []
    finally:
        small.close()


def test_health_stays_fast_while_a_big_request_tokenises(prm: PRM, encodes: list[int]) -> None:
    app = create_app(prm)
    big = items(4000, start=10_000) + [{"problem": "7 " * 20_000, "steps": ["so"]}]  # the last is too long: no scoring

    async def big_and_health() -> tuple[httpx.Response, float, list[float]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test", timeout=60) as client:
            started = time.perf_counter()
            scoring = asyncio.ensure_future(client.post("/v1/score", json={"items": big}))
            while not encodes:  # the body is parsed and tokenising began
                await asyncio.sleep(0.005)
            latencies = []
            while not scoring.done():
                asked = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - asked)
                await asyncio.sleep(0.02)
            return await scoring, time.perf_counter() - started, latencies

    response, seconds, latencies = asyncio.run(big_and_health())
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("items: item 4000: ")
    assert len(encodes) == 4001 and seconds > 0.5  # the big request did tokenise everything, for a while
    # The event loop stays free: /health answers in milliseconds; a rare GIL hand-off from the tokenizer threads
    # may delay one answer (0.12 s seen once on 2 busy cores), far from the 0.5 s a tokenising event loop gave.
    assert len(latencies) >= 10 and sorted(latencies)[len(latencies) // 2] < 0.02 and max(latencies) < 0.3, latencies


# The API key before the body ------------------------------------------------------------------------


def test_a_big_body_without_the_key_gets_401_before_it_is_sent(slow_server: ServerProcess) -> None:
    host, port = slow_server.url.removeprefix("http://").split(":")
    declared = 16_800_000
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode() + b'{"items": [' + b" " * 65536)  # then the client stalls, the body far from sent
        sock.settimeout(5)
        started = time.monotonic()
        answer = sock.recv(65536)
        while b"}}" not in answer:  # the error body may come in a packet of its own
            answer += sock.recv(65536)
        assert time.monotonic() - started < 1.0
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"type": "unauthorized"' in answer
    assert httpx.get(slow_server.url + "/health").status_code == 200
    assert httpx.get(slow_server.url + "/ping").status_code == 200
    assert httpx.get(slow_server.url + "/metrics").status_code == 200  # open unless --protect-metrics
    assert httpx.get(slow_server.url + "/openapi.json").status_code == 200


def test_protect_metrics_puts_metrics_and_docs_behind_the_key_but_not_the_page_or_probes(prm: PRM) -> None:
    app = create_app(prm, api_key=API_KEY, protect_metrics=True)

    async def statuses(headers: dict) -> dict[str, int]:
        paths = ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/health", "/ping", "/version", "/", "/ui-assets/ui.js"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return {path: (await client.get(path, headers=headers)).status_code for path in paths}

    without = asyncio.run(statuses({}))
    assert {p: s for p, s in without.items() if s == 401} == dict.fromkeys(["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"], 401)
    assert set(asyncio.run(statuses(AUTH)).values()) == {200}
    assert set(asyncio.run(statuses({"Authorization": "Bearer nope"})).values()) == {200, 401}


def test_the_key_applies_under_a_root_path(prm: PRM) -> None:
    app = create_app(prm, api_key=API_KEY)

    async def get(path: str) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app, root_path="/prm"), base_url="http://test") as client:
            return (await client.get(path)).status_code

    assert asyncio.run(get("/prm/v1/models")) == 401
    assert asyncio.run(get("/prm/health")) == 200


# The schema ----------------------------------------------------------------------------------------


def openapi(app) -> dict:
    async def go() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return (await client.get("/openapi.json", headers=AUTH)).json()

    return asyncio.run(go())


def declared(schema: dict, method: str, path: str) -> set[int]:
    return {int(code) for code in schema["paths"][path][method]["responses"] if code != "200"}


def test_without_a_key_the_schema_has_no_security_and_no_401(prm: PRM) -> None:
    schema = openapi(create_app(prm))
    assert "securitySchemes" not in schema.get("components", {})
    assert all("security" not in operation for route in schema["paths"].values() for operation in route.values())
    assert declared(schema, "post", "/v1/score") == {400, 408, 413, 422, 429, 499, 503, 504}
    assert declared(schema, "post", "/v1/extend") == declared(schema, "post", "/pooling") == {400, 404, 408, 413, 422, 429, 499, 503, 504}
    assert declared(schema, "post", "/classify") == {400, 404, 408, 413, 422, 429, 499, 503, 504}
    assert declared(schema, "post", "/get_reward") == {400, 408, 413, 422, 429, 499, 503, 504}
    assert declared(schema, "post", "/v1/release") == {400, 408, 413, 422, 503}
    assert declared(schema, "get", "/v1/models") == declared(schema, "get", "/health") == set()


def test_with_a_key_the_protected_routes_declare_bearer_and_401(prm: PRM) -> None:
    schema = openapi(create_app(prm, api_key=API_KEY))
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path in [("post", "/v1/score"), ("post", "/v1/extend"), ("post", "/pooling"), ("get", "/v1/models")]:
        assert 401 in declared(schema, method, path) and schema["paths"][path][method]["security"] == [{"HTTPBearer": []}]
    for path in ("/health", "/ping", "/metrics", "/version"):
        assert 401 not in declared(schema, "get", path) and "security" not in schema["paths"][path]["get"]
    protected = openapi(create_app(prm, api_key=API_KEY, protect_metrics=True))
    assert 401 in declared(protected, "get", "/metrics")
