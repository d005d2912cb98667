"""Shared fixtures of the server, client and CLI tests: a tiny Qwen PRM, offline and behind real server processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

import tiny_checkpoints

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_paged_attention.py). It is chosen when
# triton.language is first imported, so here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

API_KEY = "test-key"
SLOW_SERVER_ARGS = ["--max-num-batched-tokens", "16", "--no-prefix-caching", "--max-queue", "4", "--api-key", API_KEY]


class ServerProcess:
    """`python -m prmserve serve` on a free loopback port, its log in a file."""

    def __init__(self, checkpoint: Path, log_dir: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "prmserve", "serve", str(checkpoint), "--port", str(self.port),
                   "--device", "cpu", "--dtype", "float32", "--log-level", "warning", *args]
        env = {k: v for k, v in os.environ.items() if k != "PRMSERVE_API_KEY"}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def metric(self, name: str, default: float | None = None) -> float:
        """One sample of /metrics, by its full name with labels; `default` when absent (else it must be there)."""
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        if match is None and default is not None:
            return default
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def pending(self) -> int:
        return httpx.get(self.url + "/health").json()["pending"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(autouse=True, scope="session")
def small_cpu_kv_pools() -> Iterator[None]:
    """PRMs built in this process get a 128 MB KV pool unless a test asks otherwise (the tiny checkpoints need a
    few MB; the 1 GB default, kept by dozens of live PRMs, made the test process's address space larger than the
    machine's memory, and forking it for Ray then failed with ENOMEM). Servers started as processes keep the default."""
    from prmserve import prm as prm_module

    real = prm_module.EngineConfig

    def config(**options: object):
        options.setdefault("kv_cache_gb", 0.125)
        return real(**options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prm_module, "EngineConfig", config)
        yield


@pytest.fixture(autouse=True)
def no_heap_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run in this process (`cli.main`) must not `gc.freeze` the test process: frozen objects are never
    collected, so each loaded PRM's KV pool (1 GB of address space) stayed, and Ray's fork then failed with ENOMEM
    under the kernel's overcommit heuristic. tests/test_robustness.py checks that the commands do freeze."""
    from prmserve.engine import loop

    monkeypatch.setattr(loop, "freeze_heap", lambda: None)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build each tiny checkpoint of tiny_checkpoints.BUILDERS once per session, on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny_checkpoints.build(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def qwen_prm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints.build("qwen_prm", tmp_path_factory.mktemp("qwen_prm"))


@pytest.fixture(scope="session")
def offline_prm(qwen_prm_dir: Path):
    """The same checkpoint scored in-process: the reference every server answer must equal."""
    from prmserve import PRM

    prm = PRM(str(qwen_prm_dir), device="cpu", dtype="float32")
    yield prm
    prm.close()


@pytest.fixture(scope="session")
def servers(qwen_prm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Started together (their start-ups overlap): "main" (defaults, 64 KiB body limit) and "slow"
    (16 tokens a step, no prefix cache, a queue of 4, an API key) whose work lasts long enough to watch."""
    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "main": ServerProcess(qwen_prm_dir, logs, "--max-body-bytes", "65536"),
        "slow": ServerProcess(qwen_prm_dir, logs, *SLOW_SERVER_ARGS),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="session")
def server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="session")
def slow_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["slow"]


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Toy models: one intra-op thread is faster, and immune to oversubscription when the host is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
