"""What a vLLM user tries against `prmserve serve`: its flags on a real process, /ping, /version, vLLM metric names,
offline /docs, clear 422s for non-JSON bodies, and /pooling's base64 and activation fields."""

from __future__ import annotations

import base64
import math
import re
import time
from importlib.metadata import version as distribution_version
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pytest

import prmserve
from conftest import ServerProcess
from test_server import assert_close, short_items

VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:request_success_total",
]


@pytest.fixture(scope="module")
def vllm_flag_server(qwen_prm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server started with vLLM's flag names (ServerProcess adds --device cpu --dtype float32 --log-level warning)."""
    server = ServerProcess(
        qwen_prm_dir, tmp_path_factory.mktemp("vllm-flags"),
        "--served-model-name", "tiny-prm", "--max-model-len", "128", "--max-num-seqs", "4", "--block-size", "8",
        "--no-enable-prefix-caching", "--enforce-eager", "-tp", "1", "--trust-remote-code", "--seed", "0",
        "--disable-log-requests", "--allowed-origins", '["http://ui.example"]',
    ).wait_ready()
    yield server
    server.stop()


def test_startup_log_tells_what_vllm_tells(vllm_flag_server: ServerProcess, qwen_prm_dir: Path) -> None:
    startup = vllm_flag_server.log()  # --log-level warning: uvicorn's own lines are not there; prmserve's are
    for line in [
        "prmserve never runs code from a checkpoint",
        f"model: {qwen_prm_dir}",
        "served model name: tiny-prm",
        "format: qwen_prm; dtype: float32; device: cpu",
        "max model length: 128 tokens",
        "blocks of 8 tokens",
        "prefix caching off",
        "compile mode: eager",
        f"serving on http://127.0.0.1:{vllm_flag_server.port}",
    ]:
        assert line in startup, startup
    assert re.search(r"KV pool: \d+ blocks of 8 tokens = \d+ tokens, \d+\.\d\d GiB", startup), startup


def test_vllm_flags_reach_the_served_api(vllm_flag_server: ServerProcess) -> None:
    url = vllm_flag_server.url
    card = httpx.get(url + "/v1/models").json()["data"][0]
    assert card["id"] == "tiny-prm" and card["max_model_len"] == 128
    item = short_items(1)[0]
    assert httpx.post(url + "/pooling", json={"model": "tiny-prm", "input": "2 + 3 = 5<extra_0>"}).status_code == 200
    assert httpx.post(url + "/v1/score", json={"items": [item]}).status_code == 200
    long = {"problem": " ".join(["7"] * 150), "steps": ["so it is"]}
    response = httpx.post(url + "/v1/score", json={"items": [item, long]})
    assert response.status_code == 400 and "item 1: the input is" in response.json()["error"]["message"]
    assert "this server takes at most 128" in response.json()["error"]["message"]
    assert 'vllm:num_requests_running{model_name="tiny-prm"}' in httpx.get(url + "/metrics").text
    preflight = httpx.options(url + "/pooling", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://ui.example"
    assert "/pooling" not in vllm_flag_server.log()  # --disable-log-requests


def test_requests_are_logged_one_line_each_by_default(server: ServerProcess) -> None:
    httpx.get(server.url + "/ping")
    # The line is written once the answer has gone out: the client can read its answer first.
    deadline = time.monotonic() + 5
    while not re.search(r"\[prmserve\] GET /ping 200 \d+\.\d ms", server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"\[prmserve\] GET /ping 200 \d+\.\d ms", server.log())


def test_ping_and_version(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/ping").status_code == 200
    assert httpx.post(server.url + "/ping").status_code == 200
    want = getattr(prmserve, "__version__", None) or distribution_version("prmserve")
    assert httpx.get(server.url + "/version").json() == {"version": want}


def test_metrics_have_vllms_names_with_the_model_label(server: ServerProcess, qwen_prm_dir: Path) -> None:
    httpx.post(server.url + "/v1/score", json={"items": short_items(3, seed=21)})
    text = httpx.get(server.url + "/metrics").text
    label = f'model_name="{qwen_prm_dir}"'
    for name in VLLM_METRICS:
        assert re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(label)}", text, re.MULTILINE), name
    assert "prmserve_prompt_tokens_total" in text  # prmserve's own stay beside them
    usage = server.metric(f"vllm:kv_cache_usage_perc{{{label}}}")
    assert 0.0 <= usage <= 1.0
    queries = server.metric(f"vllm:prefix_cache_queries_total{{{label}}}")
    assert queries == server.metric(f"vllm:prompt_tokens_total{{{label}}}") == server.metric("prmserve_prompt_tokens_total")
    assert server.metric(f"vllm:prefix_cache_hits_total{{{label}}}") == server.metric("prmserve_cached_tokens_total")
    successes = server.metric(f'vllm:request_success_total{{finished_reason="stop",{label}}}')
    assert successes == server.metric(f"vllm:e2e_request_latency_seconds_count{{{label}}}") >= 3


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(server: ServerProcess, page: str) -> None:
    response = httpx.get(server.url + page)
    assert response.status_code == 200
    html = response.text
    urls = re.findall(r"https?://[^\s'\"<>)]+", html)
    assert all(urlparse(u).netloc == urlparse(server.url).netloc for u in urls), urls
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        assert httpx.get(urljoin(server.url + page, asset)).status_code == 200, asset


def test_a_form_encoded_body_gets_a_422_naming_the_content_type(server: ServerProcess) -> None:
    body = '{"items": [{"problem": "1+1?", "steps": ["1 + 1 = 2."]}]}'  # what the README's curl sent without -H
    response = httpx.post(server.url + "/v1/score", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"] == (
        "the body must be JSON: send 'Content-Type: application/json' (got 'application/x-www-form-urlencoded')"
    )
    assert error["param"] is None


def test_malformed_json_gets_the_decoder_message_and_where(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/score", content=b'{"items": [\n  {"problem": x}]}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"] == "the body is not valid JSON: Expecting value at line 2 column 15"
    assert error["param"] is None


def test_pooling_base64_round_trips_to_the_float_rows(server: ServerProcess) -> None:
    request = {"input": ["2 + 3 = 5<extra_0>so 5<extra_0>", "1 + 1 = 2<extra_0>"]}
    floats = httpx.post(server.url + "/pooling", json=request).json()["data"]
    for endianness, order in (("native", "="), ("little", "<"), ("big", ">")):
        body = {**request, "encoding_format": "base64", "endianness": endianness}
        encoded = httpx.post(server.url + "/pooling", json=body).json()["data"]
        for want, got in zip(floats, encoded):
            values = np.frombuffer(base64.b64decode(got["data"]), f"{order}f4").reshape(-1, 2)
            assert_close(values.flatten().tolist(), np.array(want["data"], dtype=np.float32).flatten().tolist())


def test_pooling_without_activation_gives_the_heads_raw_logits(server: ServerProcess) -> None:
    request = {"input": "2 + 3 = 5<extra_0>so 5<extra_0>"}
    activated = httpx.post(server.url + "/pooling", json=request).json()["data"][0]["data"]
    for off in ({"use_activation": False}, {"activation": False}, {"softmax": False}):
        raw = httpx.post(server.url + "/pooling", json={**request, **off}).json()["data"][0]["data"]
        assert len(raw) == len(activated)
        for (a, b), (p0, p1) in zip(raw, activated):  # the Qwen PRM head: two logits, softmax -> [1 - r, r]
            assert math.isclose(1 / (1 + math.exp(a - b)), p1, abs_tol=1e-5) and math.isclose(p0 + p1, 1, abs_tol=1e-6)
    on = httpx.post(server.url + "/pooling", json={**request, "use_activation": True, "activation": False}).json()
    assert on["data"][0]["data"] == activated  # use_activation wins, as in vLLM


@pytest.mark.parametrize("field", [{"encoding_format": "binary"}, {"embed_dtype": "fp8_e4m3"}, {"use_activation": "no"}])
def test_pooling_refuses_what_it_cannot_honour(server: ServerProcess, field: dict) -> None:
    response = httpx.post(server.url + "/pooling", json={"input": "2 + 3 = 5<extra_0>", **field})
    assert response.status_code == 422 and response.json()["error"]["param"] == next(iter(field))


@pytest.mark.parametrize(("path", "body"), [
    ("/classify", {"input": []}), ("/classify", {"input": ""}),
    ("/pooling", {"input": []}), ("/pooling", {"input": ""}), ("/pooling", {"messages": []}),
])
def test_an_empty_input_is_refused_naming_its_field(server: ServerProcess, path: str, body: dict) -> None:
    """Nothing to score is an error, not an empty answer (vLLM's /classify refuses it too, with a 400: vLLM answers
    every invalid body 400, prmserve a body against its schema 422, as for /v1/score's empty `items`)."""
    response = httpx.post(server.url + path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == next(iter(body)) and "must not be empty" in error["message"]
