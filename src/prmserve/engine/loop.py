"""A background thread that drives the engine, so many callers (threads or asyncio tasks) share it.

Callers get a `concurrent.futures.Future` per request; cancelling it (or the asyncio future that
wraps it) aborts the request and frees its memory. Errors inside a step fail that step's requests,
never the loop.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError

from prmserve.engine.engine import Engine
from prmserve.engine.request import Request, new_request_id
from prmserve.engine.sleep import SleepReport
from prmserve.errors import EngineSleepingError, InvalidInputError, QueueFullError, RequestCancelledError
from prmserve.models.transformer import RewardModel


GPU_POLL_S = 2e-4  # while the GPU runs a step and nothing arrives, how often the loop looks whether it is done
HAND_OFF_S = 0.01  # the longest a caller waits for an idle engine to launch the first part of a call given in parts


class EngineLoop:
    """Thread-safe front of an `Engine`: `submit` from any thread, results through futures.

    A step that raises fails every request the loop holds (queued ones too): the engine state they
    depend on is suspect, and callers can resubmit.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet finished: the queue-depth limit applies to it
        self._stopping = False
        self._sleeping = False  # from a sleep's call until its wake_up: submissions are refused
        self._sleep_asked: tuple[int, Future] | None = None  # a sleep waiting for the work in flight to finish
        self._stepped = threading.Condition()  # notified after each step's host part (the launch, on a GPU)
        self._steps = 0
        # A call given in parts to an idle engine waits for its first part's launch before planning the next (see
        # `Reservation.submit`). On a CPU the launch is the whole forward, which the planning should overlap instead.
        self.hand_off_first_part = engine.device.type == "cuda"
        self._thread = threading.Thread(target=self._run, name="prmserve-engine", daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet finished (queued or computing)."""
        return self._pending

    def submit(self, token_ids: list[int], read_positions: list[int], priority: int = 0) -> Future:
        """Queue one request; the future resolves to the finished `Request` (outputs and usage)."""
        return self.submit_many([(token_ids, read_positions)], priority)[0]

    def submit_many(self, items: Sequence[tuple[list[int], list[int]]], priority: int = 0) -> list[Future]:
        """Queue (token_ids, read_positions) pairs together: admitted or refused as a whole, and seen
        by the same scheduling step, so their shared prefix is computed once."""
        return self.submit_requests(
            [Request(new_request_id(), list(token_ids), list(read_positions), priority) for token_ids, read_positions in items]
        )

    def submit_requests(self, requests: Sequence[Request]) -> list[Future]:
        """Queue requests built by the caller (e.g. with `keep_tokens` or a parent's block hashes), as a whole.

        The one queue limit: at most `max_queue` requests pending (queued or computing); more at once
        than it can ever hold is an invalid input, not a full queue to retry.
        """
        with self.reserve(len(requests)) as room:
            return room.submit(requests)

    def reserve(self, count: int) -> Reservation:
        """Hold room in the queue for `count` requests that will be submitted in parts (`Reservation.submit`), so a
        big call is admitted or refused as a whole while the engine starts on its first part; close it when done."""
        limit = self.engine.config.max_queue
        if limit is not None and count > limit:
            raise InvalidInputError(f"{count} requests at once can never fit the queue of {limit}; split them")
        with self._lock:
            self._check_open()
            if limit is not None and self._pending + count > limit:
                raise QueueFullError(f"the engine is busy: {self._pending} requests are pending; {count} more exceed the limit of {limit}; retry later")
            idle = self._pending == 0
            self._pending += count
        return Reservation(self, count, hand_off=idle and self.hand_off_first_part)

    def _check_open(self) -> None:
        """Refuse new work while stopping or asleep (call under the lock)."""
        if self._stopping:
            raise RequestCancelledError("the engine is shutting down")
        if self._sleeping:
            raise EngineSleepingError("the engine is asleep (sleep mode): call wake_up first, or retry later")

    def _enqueue(self, requests: Sequence[Request]) -> list[Future]:
        """Queue requests whose room is reserved already; one inbox message, so one step sees them all."""
        pairs = []
        for request in requests:
            future: Future = Future()
            future.add_done_callback(lambda f, rid=request.request_id: f.cancelled() and self._inbox.put(("abort", rid)))
            pairs.append((request, future))
        # Checked and queued under one lock, so no request can slip in behind shutdown's stop message.
        with self._lock:
            self._check_open()
            self._inbox.put(("add", pairs))
        return [future for _, future in pairs]

    def unpin(self, key: str) -> None:
        """Release a kept request's pinned blocks, on the engine thread (fire and forget)."""
        self._inbox.put(("unpin", key))

    def reset_prefix_cache(self) -> None:
        """Drop all cached prefixes, on the engine thread; returns once done."""
        done: Future = Future()
        self._inbox.put(("reset", done))
        done.result()

    @property
    def is_sleeping(self) -> bool:
        """From a `sleep` call (its work in flight still finishing) until its `wake_up`."""
        return self._sleeping

    def sleep(self, level: int = 1) -> SleepReport:
        """Refuse new work (EngineSleepingError), let what was submitted finish, then put the engine to sleep;
        returns once asleep. Asleep already: nothing happens (0 bytes freed)."""
        with self._lock:
            if self._sleeping:
                return SleepReport(level, 0, "already asleep", 0.0)
            self._sleeping = True
        done: Future = Future()
        self._inbox.put(("sleep", (level, done)))
        try:
            return done.result()
        except BaseException:
            self._sleeping = self.engine.sleep_level > 0
            raise

    def wake_up(self, reload: Callable[[], RewardModel] | None = None) -> None:
        """Wake the engine (`reload` gives the weights again after level 2) and take work again; awake: nothing happens."""
        done: Future = Future()
        self._inbox.put(("wake", (reload, done)))
        done.result()
        self._sleeping = False

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the thread."""
        with self._lock:
            self._stopping = True
            self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def _settle(self, request_id: str) -> Future | None:
        with self._lock:
            future = self._futures.pop(request_id, None)
            if future is not None:
                self._pending -= 1
        return future

    def _run(self) -> None:
        stop = False
        while True:
            block = not self.engine.has_unfinished()
            if stop and block:
                return
            if not block:
                stop = self._make_way() or stop
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                kind = None
            while kind is not None:
                stop = self._handle(kind, payload) or stop
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    kind = None
            if self.engine.has_unfinished():
                self._step()
            if self._sleep_asked is not None and not self.engine.has_unfinished():  # the work in flight is done
                (level, done), self._sleep_asked = self._sleep_asked, None
                _call(done, self.engine.sleep, level)

    def _make_way(self) -> bool:
        """Until the next step may be launched (`Engine.make_way`), take in what arrives while the GPU runs the last
        one, so a call queued meanwhile is scheduled behind it at once instead of after it; whether a stop came."""
        stop = False
        while not self.engine.make_way():  # the queue is looked at again only when something arrived
            try:
                kind, payload = self._inbox.get(timeout=GPU_POLL_S)
            except queue.Empty:
                if self.engine.gpu_done():
                    return stop
                continue
            stop = self._handle(kind, payload) or stop
        return stop

    def _handle(self, kind: str, payload: object) -> bool:
        """Act on one inbox message; whether it was the stop message."""
        if kind == "add":
            for request, future in payload:
                self._add(request, future)
        elif kind == "abort":
            self.engine.abort(payload)
            self._settle(payload)
        elif kind == "unpin":
            self.engine.unpin(payload)
        elif kind == "reset":
            self.engine.reset_prefix_cache()
            payload.set_result(None)
        elif kind == "sleep":
            self._sleep_asked = payload
        elif kind == "wake":
            self._wake(*payload)
        return kind == "stop"

    def _wake(self, reload: Callable[[], RewardModel] | None, done: Future) -> None:
        if self._sleep_asked is not None:  # woken before it fell asleep
            _resolve(self._sleep_asked[1], exception=RequestCancelledError("woken up before the engine fell asleep"))
            self._sleep_asked = None
        if self.engine.sleep_level:
            _call(done, self.engine.wake_up, reload)
        else:
            _resolve(done)

    def _add(self, request: Request, future: Future) -> None:
        with self._lock:
            self._futures[request.request_id] = future
        if future.cancelled():
            self._settle(request.request_id)
            return
        try:
            self.engine.add(request)
        except Exception as exc:
            _resolve(self._settle(request.request_id), exception=exc)

    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception as exc:  # a failed forward fails every request in flight, not the loop
            for request_id in list(self._futures):
                self.engine.abort(request_id)
                _resolve(self._settle(request_id), exception=exc)
            return
        finally:
            with self._stepped:
                self._steps += 1
                self._stepped.notify_all()
        for request in done:
            _resolve(self._settle(request.request_id), result=request)

    def _wait_launched(self, request: Request, since: int, timeout: float) -> None:
        """Until a step after `since` has scheduled `request` and launched (at most `timeout` seconds), without
        holding the interpreter lock."""
        with self._stepped:
            self._stepped.wait_for(lambda: self._steps > since and request.scheduled_at is not None, timeout)


class Reservation:
    """Room held in an `EngineLoop`'s queue (`EngineLoop.reserve`): parts of one call are submitted against it, and
    closing it gives back what was not used (the call failed or ended early).

    With `hand_off` (the engine was idle, on a GPU), the first part's submission returns once the engine has launched
    it, when more parts follow: planning the next part (Python, under the interpreter lock) while the engine prepares
    that step made its preparation 2-3x longer (CPU step timeline of the beam replay; bench/notes/step_gaps_2026-12-07.md).
    """

    def __init__(self, loop: EngineLoop, count: int, hand_off: bool = False) -> None:
        self.loop = loop
        self.left = count
        self.hand_off = hand_off

    def submit(self, requests: Sequence[Request]) -> list[Future]:
        """Queue these requests in the reserved room (refused while stopping or asleep, as any submission)."""
        if len(requests) > self.left:
            raise InvalidInputError(f"{len(requests)} requests exceed the {self.left} reserved")
        since = self.loop._steps
        futures = self.loop._enqueue(requests)
        self.left -= len(requests)
        if self.hand_off and requests and self.left:
            self.loop._wait_launched(requests[0], since, HAND_OFF_S)
        self.hand_off = False
        return futures

    def close(self) -> None:
        """Give the unused room back."""
        with self.loop._lock:
            self.loop._pending -= self.left
        self.left = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def freeze_heap() -> None:
    """Move everything alive now (model, KV blocks, imported libraries: ~400k objects) out of the cyclic
    collector's sight, so its full passes scan only what requests create: the host side of the
    beam-search replay takes 170-190 ms with it, 215-465 ms without (bench/host_overhead.py).

    Cyclic garbage among those objects is never collected, so only a process prmserve owns calls it
    (`prmserve serve`, `score`, `demo`, `evaluate` and a Ray `PRMActor`, once the model is loaded), never the
    library itself. On an H100 host a loaded 1.5B process tracks ~770k objects, and one full pass over them
    took 357 ms of a beam-search call (bench/gc_pauses.py).
    """
    gc.freeze()


def _call(future: Future, function: Callable, *args: object) -> None:
    """Run `function(*args)` on the engine thread and hand its result or error to `future`."""
    try:
        result = function(*args)
    except Exception as exc:
        _resolve(future, exception=exc)
    else:
        _resolve(future, result=result)


def _resolve(future: Future | None, result: object = None, exception: BaseException | None = None) -> None:
    """Complete a future unless its caller cancelled it meanwhile."""
    if future is None:
        return
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled between our check and now: nobody waits for it
