"""Races between the threads that share a PRM: callers, the engine thread, and metrics scrapes."""

from __future__ import annotations

import random
import threading
import time

import pytest

from prmserve import PRM
from prmserve.engine import EngineLoop
from prmserve.engine.request import RequestStatus
from tiny_checkpoints import build

THREADS = 8
STRESS_S = 3.0  # the unfixed `stats()` failed about 10 times a second under this load

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build("skywork_prm", tmp_path_factory.mktemp("races") / "skywork_prm")


def engine_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "prmserve-engine")


def test_first_calls_from_many_threads_start_one_engine_loop(checkpoint, monkeypatch):
    import prmserve.prm as prm_module

    class SlowLoop(EngineLoop):
        """Widens the window between "no loop yet" and "the loop is set" that an unlocked check races through."""

        def __init__(self, engine) -> None:
            time.sleep(0.05)
            super().__init__(engine)

    monkeypatch.setattr(prm_module, "EngineLoop", SlowLoop)
    prm = PRM(str(checkpoint), device="cpu", num_kv_blocks=64, block_size=4)
    before = engine_threads()
    barrier = threading.Barrier(THREADS)
    loops = []

    def first_call() -> None:
        barrier.wait()
        loops.append(prm.loop)

    callers = [threading.Thread(target=first_call) for _ in range(THREADS)]
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert engine_threads() - before == 1
        assert len({id(loop) for loop in loops}) == 1
    finally:
        prm.close()


def test_scrapes_never_race_the_engine_thread(checkpoint):
    """`Engine.stats()` and the metrics collector read counters, never the scheduler's containers."""
    from prmserve.server.metrics import ServerMetrics

    prm = PRM(str(checkpoint), device="cpu", num_kv_blocks=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    metrics = ServerMetrics(prm, "tiny")
    stop = threading.Event()
    errors: list[BaseException] = []
    scrapes = [0]

    def score(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            batch = [([rng.randrange(1, 400) for _ in range(rng.randrange(2, 12))], [0]) for _ in range(32)]
            for future in prm.loop.submit_many(batch):
                future.result()

    def scrape(read) -> None:
        while not stop.is_set():
            try:
                read()
            except Exception as exc:  # noqa: BLE001 - any failure of a scrape is the bug
                errors.append(exc)
            scrapes[0] += 1

    workers = [threading.Thread(target=score, args=(seed,)) for seed in range(4)]
    workers += [threading.Thread(target=scrape, args=(prm.engine.stats,)), threading.Thread(target=scrape, args=(metrics.render,))]
    try:
        for t in workers:
            t.start()
        time.sleep(STRESS_S)
    finally:
        stop.set()
        for t in workers:
            t.join()
    scheduler = prm.engine.scheduler
    recounted = [sum(1 for r in scheduler.requests.values() if r.status is s) for s in (RequestStatus.WAITING, RequestStatus.RUNNING)]
    prm.close()
    assert scrapes[0] > 100
    assert not errors, f"{len(errors)} of {scrapes[0]} scrapes failed, first: {errors[0]!r}"
    assert [scheduler.num_waiting, scheduler.num_running] == recounted == [0, 0]
