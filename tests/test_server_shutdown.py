"""A real `prmserve serve`: a client that stalls mid-body gets 408 in time, and SIGTERM ends the process within
--shutdown-timeout whatever its clients do, answering what computes and 503 for the rest."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from conftest import ServerProcess
from test_server import assert_close, long_item, short_items, wait_until

SLOW_ENGINE = ("--max-num-batched-tokens", "16", "--no-prefix-caching")


def send_partial_body(url: str, declared: int = 100, sent: bytes = b'{"items":') -> socket.socket:
    """A POST whose Content-Length promises `declared` bytes of which only `sent` come: the stalled client."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (at most `timeout` seconds)."""
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_stalled_body_gets_408_within_the_read_timeout_and_its_connection_closes(qwen_prm_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(qwen_prm_dir, tmp_path, "--body-read-timeout", "1").wait_ready()
    try:
        started = time.monotonic()
        with send_partial_body(server.url) as sock:
            response = read_until_closed(sock, timeout=5)  # recv returns b"" once the server closed it
        waited = time.monotonic() - started
        assert status_of(response) == 408 and b'"type": "request_timeout"' in response
        assert 1.0 <= waited < 2.0
        assert httpx.post(server.url + "/v1/score", json={"items": short_items(1)}).status_code == 200  # others unharmed
    finally:
        assert server.stop() == 0


def test_sigterm_with_a_stalled_client_exits_within_the_bound_and_answers_the_computing_request(
    qwen_prm_dir: Path, tmp_path: Path, offline_prm
) -> None:
    server = ServerProcess(qwen_prm_dir, tmp_path, *SLOW_ENGINE, "--shutdown-timeout", "10").wait_ready()
    try:
        item = long_item(40, digits=700)  # about a second of work at 16 tokens a step
        with ThreadPoolExecutor(1) as pool, send_partial_body(server.url) as stalled:
            computing = pool.submit(httpx.post, server.url + "/v1/score", json={"items": [item]}, timeout=30)
            wait_until(lambda: server.pending() == 1, what="the request to be computing")
            signalled = time.monotonic()
            server.proc.terminate()
            refused = read_until_closed(stalled, timeout=5)
            refused_after = time.monotonic() - signalled
            answered = computing.result()
        assert server.proc.wait(10) == 0, server.log()
        exited_after = time.monotonic() - signalled
    finally:
        server.stop()
    assert status_of(refused) == 503 and b"retry-after: 1" in refused.lower()
    assert refused_after < 1.0  # at once, not after --body-read-timeout (30 s)
    assert answered.status_code == 200
    assert_close(answered.json()["results"][0]["step_rewards"], offline_prm.score([item])[0].step_rewards)
    assert exited_after < 10.0


def test_work_still_computing_at_the_bound_gets_503_and_the_process_exits_in_time(qwen_prm_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(qwen_prm_dir, tmp_path, *SLOW_ENGINE, "--shutdown-timeout", "2").wait_ready()
    try:
        items = [long_item(seed, digits=1500) for seed in range(50, 56)]  # over 10 s of work in all
        with ThreadPoolExecutor(len(items)) as pool:
            futures = [pool.submit(httpx.post, server.url + "/v1/score", json={"items": [it]}, timeout=30) for it in items]
            wait_until(lambda: server.pending() == len(items), what="all requests queued")
            signalled = time.monotonic()
            server.proc.terminate()
            responses = [f.result() for f in futures]
            answered_after = time.monotonic() - signalled
        assert server.proc.wait(10) == 0, server.log()
        exited_after = time.monotonic() - signalled
    finally:
        server.stop()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    refusal = next(r for r in responses if r.status_code == 503)
    assert refusal.json()["error"]["type"] == "shutting_down" and refusal.headers["Retry-After"] == "1"
    assert 0.9 <= answered_after < 2.0  # at the bound less uvicorn's margin
    assert exited_after < 3.0, server.log()
