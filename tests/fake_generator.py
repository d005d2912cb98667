"""A deterministic OpenAI-compatible completions server on loopback: it answers with steps of bundled solutions.

The prompt names the problem (after the template's problem part) and how many steps came before (one
separator after each); choice i of a request with seed s continues with that step of solution (s + i) mod
the number of solutions, so a best-of-N candidate with seed s follows solution s mod N throughout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prmserve.search.templates import DEFAULT_PROMPT_TEMPLATE, STEP_SEPARATOR

MODEL = "fake-policy"


class FakeGenerator:
    """The server, started in a thread; `requests` holds every completions body it got, `url` where it listens."""

    def __init__(self, problems: Sequence[dict[str, Any]], template: str = DEFAULT_PROMPT_TEMPLATE) -> None:
        self.heads = [(template.replace("{problem}", p["problem"]), p["solutions"]) for p in problems]
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeGenerator":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
        prompt = body["prompt"]
        for head, solutions in self.heads:
            if prompt.startswith(head):
                done = prompt[len(head):].count(STEP_SEPARATOR)
                seed = body.get("seed", 0)
                choices = [_choice(i, solutions[(seed + i) % len(solutions)], done) for i in range(body["n"])]
                return 200, {"id": "cmpl-fake", "object": "text_completion", "model": MODEL, "choices": choices}
        return 400, {"error": {"message": "unknown problem", "type": "BadRequestError"}}


def _choice(index: int, steps: list[str], done: int) -> dict[str, Any]:
    """Step `done` of a solution, stopped at the separator; past its end, nothing and 'length' (the text ran out)."""
    if done < len(steps):
        return {"index": index, "text": steps[done], "finish_reason": "stop"}
    return {"index": index, "text": "", "finish_reason": "length"}


def _handler(fake: FakeGenerator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._answer(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self._answer(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/completions":
                self._answer(*fake.complete(body))
            else:
                self._answer(404, {"error": {"message": "not found"}})

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # quiet test output
            pass

    return Handler
