"""The node API over HTTP: /v1/score with keep, /v1/extend, /v1/release, and their errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from prmserve.server import create_app

PROBLEM = "Tom has 3 apples and buys 2 more. Then he doubles them. How many?"
NODE = ["3 + 2 = 5 apples.", "5 * 2 = 10."]
CHILDREN = [["The answer is 10."], ["So he has 11.", "The answer is 11."]]


@pytest.fixture(scope="module")
def app(offline_prm):
    return create_app(offline_prm)


def post(app, path: str, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.post(path, json=body)

    return asyncio.run(go())


def test_keep_extend_release_over_http(app, offline_prm) -> None:
    scored = post(app, "/v1/score", {"items": [{"problem": PROBLEM, "steps": NODE}], "keep": True})
    assert scored.status_code == 200, scored.text
    handle = scored.json()["results"][0]["handle"]
    assert isinstance(handle, str) and handle
    kids = post(app, "/v1/extend", {"handle": handle, "children": CHILDREN, "aggregate": "last", "keep": True})
    assert kids.status_code == 200, kids.text
    results = kids.json()["results"]
    want = offline_prm.score([{"problem": PROBLEM, "steps": NODE + c} for c in CHILDREN])
    for got, expected in zip(results, want):
        assert got["step_rewards"] == pytest.approx(expected.step_rewards, abs=1e-6)
        assert got["aggregate"] == got["step_rewards"][-1]
        assert got["handle"] and got["usage"]["cached_tokens"] > 0
    grandchild = post(app, "/v1/extend", {"handle": results[1]["handle"], "children": [["Check: 11 != 10."]]})
    assert grandchild.status_code == 200 and grandchild.json()["results"][0]["handle"] is None
    released = post(app, "/v1/release", {"handles": [handle, results[0]["handle"], results[1]["handle"], "gone"]})
    assert released.json() == {"released": 3}
    missing = post(app, "/v1/extend", {"handle": handle, "children": CHILDREN})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "HandleNotFoundError"
    assert missing.json()["error"]["param"] == "handle"


def test_score_without_keep_has_no_handle(app) -> None:
    response = post(app, "/v1/score", {"items": [{"problem": PROBLEM, "steps": NODE}]})
    assert response.json()["results"][0]["handle"] is None


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"children": [["x"]]}, 422, "handle"),
        ({"handle": "h", "children": []}, 422, "children"),
        ({"handle": "h", "children": ["not a list"]}, 422, "children"),
        ({"handle": "h", "children": [["x"]], "keep": "yes"}, 422, "keep"),
    ],
)
def test_malformed_extend_requests(app, body, status, needle) -> None:
    response = post(app, "/v1/extend", body)
    assert response.status_code == status
    assert needle in response.text


def test_bad_children_name_the_child(app) -> None:
    handle = post(app, "/v1/score", {"items": [{"problem": PROBLEM, "steps": NODE}], "keep": True}).json()["results"][0]["handle"]
    response = post(app, "/v1/extend", {"handle": handle, "children": [["fine"], [" "]]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "children: child 1: step 2 is empty"
    assert response.json()["error"]["param"] == "children"


def test_keep_needs_problem_and_steps(app) -> None:
    response = post(app, "/v1/score", {"items": [{"text": "1 + 1 = 2<extra_0>"}], "keep": True})
    assert response.status_code == 400 and "keep=True needs a problem" in response.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/score", {"items": [{"problem": "a\ud800b", "steps": ["x"]}]}, "items"),
        ("/v1/score", {"items": [{"problem": "p", "steps": ["x", "\udfff"]}]}, "items"),
        ("/v1/score", {"items": [{"text": "x\ud800<extra_0>"}]}, "items"),
        ("/pooling", {"input": "x\ud800<extra_0>"}, "input"),
        ("/pooling", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(app, path: str, body: dict, param: str) -> None:
    """JSON allows "\\ud800"; UTF-8 does not: the tokenizer must never see it (it would be a 500)."""
    import json as json_module

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            raw = json_module.dumps(body)  # keeps the escape: a client sending it as JSON text
            return await client.post(path, content=raw, headers={"content-type": "application/json"})

    response = asyncio.run(go())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert "not valid Unicode" in response.json()["error"]["message"]


def test_a_lone_surrogate_offline_is_an_invalid_input_error(offline_prm) -> None:
    from prmserve.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="item 0: step 1 holds a character that is not valid Unicode"):
        offline_prm.score([{"problem": "p", "steps": ["ok", "bad \ud800"]}])
