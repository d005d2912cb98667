"""`ReplicaPool`: engine requests spread over `PRMActor` replicas, with `EngineLoop`'s interface (futures per request,
one queue limit, sleep and wake), so `PRM`'s planning and collecting work unchanged above it (`RoutedPRM`).

Requests of one submission that go to one replica travel in one actor call, so the replica's engine sees them in one
step (shared prefixes computed once). A replica that dies (`RayActorError`) is left out, and what it held is sent again
to the others; a request is lost only when no replica is left.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError

import ray
from ray.exceptions import RayActorError, RayTaskError

from prmserve.engine import EngineStats, Request
from prmserve.engine.sleep import SleepReport
from prmserve.errors import EngineSleepingError, InvalidInputError, QueueFullError, RequestCancelledError
from prmserve.ray.actor import RequestSpec
from prmserve.ray.routing import choose_replica, home_of, with_home

DEFAULT_MAX_IMBALANCE = 64  # requests a problem's replica may hold above the least loaded before its problems spill over


class ReplicaPool:
    """Thread-safe front of N replicas: `submit_requests` from any thread, results through futures."""

    def __init__(self, replicas: Sequence[ray.actor.ActorHandle], max_queue: int | None = None,
                 max_imbalance: int = DEFAULT_MAX_IMBALANCE) -> None:
        self.replicas = list(replicas)
        self.max_queue, self.max_imbalance = max_queue, max_imbalance
        self.alive = set(range(len(self.replicas)))
        self.retried = 0  # requests sent again after their replica died
        self._load = dict.fromkeys(self.alive, 0)  # requests in flight per live replica
        self._where: dict[str, int] = {}  # id of a request in flight -> its replica
        self._stats = ray.get([r.stats.remote() for r in self.replicas])
        self._lock = threading.Lock()
        self._pending = 0
        self._sleeping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prmserve-replicas", daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def submit_requests(self, requests: Sequence[Request]) -> list[Future]:
        """Queue requests as `EngineLoop.submit_requests` does (one limit, all or none), each to its replica."""
        limit = self.max_queue
        if limit is not None and len(requests) > limit:
            raise InvalidInputError(f"{len(requests)} requests at once can never fit the queue of {limit}; split them")
        groups: dict[int, list[tuple[Request, Future]]] = defaultdict(list)
        with self._lock:
            if self._sleeping:
                raise EngineSleepingError("the engine is asleep (sleep mode): call wake_up first, or retry later")
            if not self.alive:
                raise RequestCancelledError("every replica has died")
            if limit is not None and self._pending + len(requests) > limit:
                raise QueueFullError(f"the engine is busy: {self._pending} requests are pending; {len(requests)} more "
                                     f"exceed the limit of {limit}; retry later")
            self._pending += len(requests)
            for request in requests:
                groups[self._place(request)].append((request, Future()))
        for replica, group in groups.items():
            for request, future in group:
                future.add_done_callback(lambda f, r=request: f.cancelled() and self._cancelled(r.request_id))
            asyncio.run_coroutine_threadsafe(self._send(replica, group), self._loop)
        placed = {id(r): f for group in groups.values() for r, f in group}
        return [placed[id(r)] for r in requests]

    def _place(self, request: Request) -> int:
        """Choose the request's replica and write it into its id (under the lock)."""
        replica = choose_replica(request.request_id, self._load, self.max_imbalance)
        request.request_id = with_home(request.request_id, replica)
        self._load[replica] += 1
        self._where[request.request_id] = replica
        return replica

    async def _send(self, replica: int, group: list[tuple[Request, Future]]) -> None:
        group = [(r, f) for r, f in group if not f.done()]
        if not group:
            return
        try:
            outcomes, stats = await self.replicas[replica].run.remote([RequestSpec.of(r) for r, _ in group])
        except RayActorError:
            self._resend(replica, group)
            return
        except RayTaskError as exc:  # the replica refused them (queue full, too long, asleep): its own error
            for request, future in group:
                self._settle(request, future, exception=exc.cause if isinstance(exc.cause, BaseException) else exc)
            return
        except Exception as exc:
            for request, future in group:
                self._settle(request, future, exception=exc)
            return
        self._stats[replica] = stats
        for (request, future), outcome in zip(group, outcomes):
            request.outputs, request.num_cached = outcome.outputs, outcome.num_cached
            if outcome.queue_seconds is not None:
                request.scheduled_at = request.created_at + outcome.queue_seconds
            self._settle(request, future, result=request)

    def _resend(self, dead: int, group: list[tuple[Request, Future]]) -> None:
        """A replica died with these requests: leave it out and send them to the others, by the same rules."""
        groups: dict[int, list[tuple[Request, Future]]] = defaultdict(list)
        with self._lock:
            if dead in self.alive:
                self.alive.discard(dead)
                del self._load[dead]
            for request, future in group:
                self._where.pop(request.request_id, None)
                if not self.alive:
                    self._pending -= 1
                    _resolve(future, exception=RequestCancelledError("every replica has died"))
                    continue
                self.retried += 1
                groups[self._place(request)].append((request, future))
        for replica, regrouped in groups.items():
            self._loop.create_task(self._send(replica, regrouped))

    def _settle(self, request: Request, future: Future, result: object = None, exception: BaseException | None = None) -> None:
        with self._lock:
            replica = self._where.pop(request.request_id, None)
            if replica is None:
                return  # cancelled meanwhile, and counted then
            self._pending -= 1
            if replica in self._load:
                self._load[replica] -= 1
        _resolve(future, result, exception)

    def _cancelled(self, request_id: str) -> None:
        """A caller gave up on a request: forget it and abort it on its replica."""
        with self._lock:
            replica = self._where.pop(request_id, None)
            if replica is None:
                return
            self._pending -= 1
            if replica in self._load:
                self._load[replica] -= 1
        self.replicas[replica].abort.remote([request_id])

    def unpin(self, handle: str) -> None:
        """Release a kept node's blocks on the replica its handle names (fire and forget)."""
        replica = home_of(handle)
        if replica is not None and replica in self.alive:
            self.replicas[replica].unpin.remote(handle)

    def stats(self) -> EngineStats:
        """The replicas' totals, as of their last answers (the live ones; the dead ones' tokens stay counted)."""
        fields = EngineStats.__dataclass_fields__
        return EngineStats(**{name: sum(getattr(s, name) for s in self._stats) for name in fields})

    def refresh_stats(self) -> EngineStats:
        """Ask the live replicas for their totals now."""
        live = sorted(self.alive)
        for replica, stats in zip(live, ray.get([self.replicas[r].stats.remote() for r in live])):
            self._stats[replica] = stats
        return self.stats()

    def reset_prefix_cache(self) -> None:
        ray.get([self.replicas[r].reset_prefix_cache.remote() for r in sorted(self.alive)])

    def sleep(self, level: int = 1) -> SleepReport:
        """Refuse new work, then put every live replica to sleep (each lets its work in flight finish first); the
        memory they freed, added up."""
        with self._lock:
            if self._sleeping:
                return SleepReport(level, 0, "already asleep", 0.0)
            self._sleeping = True
        try:
            reports = ray.get([self.replicas[r].sleep.remote(level) for r in sorted(self.alive)])
        except RayTaskError as exc:
            self._sleeping = False
            raise exc.cause if isinstance(exc.cause, BaseException) else exc from None
        return SleepReport(level, sum(r.freed_bytes for r in reports), reports[0].measured_by, max(r.seconds for r in reports))

    def wake_up(self, reload: object = None) -> None:
        """Wake every live replica (each reloads its own weights after level 2); `reload` is the local engine's and unused."""
        ray.get([self.replicas[r].wake_up.remote() for r in sorted(self.alive)])
        self._sleeping = False

    def shutdown(self, timeout: float | None = None) -> None:
        """Let what was submitted finish (within `timeout`), then stop the replicas (their actors end) and the routing
        thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        for replica in self.replicas:
            ray.kill(replica)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def _resolve(future: Future, result: object = None, exception: BaseException | None = None) -> None:
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled meanwhile
