"""The FastAPI app around one `PRM`: thin routes (encode → submit → await → result) and error mapping."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.security import HTTPBearer

from prmserve.engine import Request as EngineRequest
from prmserve.engine.futures import all_done
from prmserve.engine.readout import reading
from prmserve.errors import (
    EngineSleepingError,
    FormatError,
    HandleNotFoundError,
    InputTooLongError,
    InvalidInputError,
    QueueFullError,
)
from prmserve.formats.base import render_chat
from prmserve.prm import PRM, ScoringJob
from prmserve.results import ScoreResult, TokenUsage, aggregate
from prmserve.server.args import DEFAULT_BODY_READ_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_ITEMS_PER_REQUEST
from prmserve.server.docs import ASSETS_PATH as DOCS_ASSETS_PATH, add_offline_docs
from prmserve.server.encoding import rows_to_base64
from prmserve.server.metrics import CONTENT_TYPE, ServerMetrics, pending_requests
from prmserve.server.middleware import (
    RETRY_AFTER_S,
    AuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestLogMiddleware,
    Shutdown,
)
from prmserve.server.error_handlers import APIError, BoundedIntRoute, FieldError, add_error_handlers, blamed
from prmserve.server.rl_routes import add_rl_routes
from prmserve.server.sleep_routes import add_sleep_routes
from prmserve.server.ui import ASSETS_PATH as UI_ASSETS_PATH, add_ui
from prmserve.server.protocol import (
    ErrorResponse,
    ExtendRequest,
    Health,
    ModelCard,
    ModelList,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    PoolingUsage,
    ReleaseRequest,
    ReleaseResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreResultBody,
    Usage,
    Version,
)

POOLING_TASKS = ("encode", "token_classify", "classify", "reward")
CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer
TOKENIZER_THREADS = 4  # requests tokenised at once; the rest wait their turn, the event loop never does
# What a body-reading route can answer (a stalled body, too large, invalid, the server stopping), and a scoring one too.
BODY_STATUSES = (408, 413, 422, 503)
SCORING_STATUSES = (*BODY_STATUSES, 400, 429, CLIENT_CLOSED, 504)
Queued = tuple[list[ScoringJob], list[Future]]  # planned jobs and their queued requests' futures
Checker = Callable[[list[ScoringJob], int], None]  # vets planned jobs (first item's index) before they are queued
OPEN_PATHS = ("/", "/health", "/ping", "/version")  # open even with an API key
DOCS_PATHS = ("/metrics", "/docs", "/redoc", "/openapi.json")  # open unless --protect-metrics
SWEEP_INTERVAL_S = 10.0  # how often expired node handles are let go when no call touches them
# OpenAPI links: a kept result's handle goes on to /v1/extend and /v1/release (tools such as schemathesis walk them).
_FIRST_HANDLE = "$response.body#/results/0/handle"
HANDLE_LINKS = {
    "Extend": {"operationRef": "#/paths/~1v1~1extend/post", "requestBody": {"handle": _FIRST_HANDLE},
               "description": "Score children of the first result's node (scored with `keep`)"},
    "Release": {"operationRef": "#/paths/~1v1~1release/post", "requestBody": {"handles": [_FIRST_HANDLE]},
                "description": "Let the first result's node go"},
}


def create_app(
    prm: PRM,
    *,
    api_key: str | None = None,
    protect_metrics: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT_S,
    max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
    default_timeout: float | None = None,
    served_model_names: Sequence[str] | None = None,
    max_model_len: int | None = None,
    allowed_origins: Sequence[str] | None = None,
    log_requests: bool = True,
    rl_aggregate: str = "min",
) -> FastAPI:
    """An app serving `prm`; its lifespan starts the engine thread and, on shutdown, lets it finish and stops it.

    `served_model_names` (default: the model's name) are the names clients may ask for, the first one in
    answers and metric labels; `max_model_len` lowers the longest accepted input; `allowed_origins` adds CORS;
    `protect_metrics` puts /metrics and the API docs behind `api_key` too. `app.state.shutdown.begin(s)`
    (serve.py calls it on SIGTERM) refuses new work and answers what still computes after `s` seconds with 503.
    """
    names = list(served_model_names or [prm.model_name])
    limit = effective_max_model_len(prm, max_model_len)
    metrics = ServerMetrics(prm, names[0])
    created = int(time.time())
    shutdown = Shutdown()
    tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="prmserve-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prm.engine.step_observers.append(metrics.observe_step)  # engine step metrics while this app serves
        prm.loop  # start the engine thread before the first request
        sweeper = asyncio.create_task(_expire_handles(prm))
        try:
            yield
        finally:
            sweeper.cancel()
            tokenizers.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(prm.close)
            prm.engine.step_observers.remove(metrics.observe_step)

    app = FastAPI(title="prmserve", summary="Process reward model scoring", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.shutdown = shutdown
    app.router.route_class = BoundedIntRoute  # before any route is added
    add_offline_docs(app)
    add_ui(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, read_timeout=body_read_timeout, shutdown=shutdown)
    if api_key is not None:  # outside the body limit: a request without the key is refused before its body is read
        _add_auth(app, api_key, protect_metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if log_requests:
        app.add_middleware(RequestLogMiddleware)
    if allowed_origins is not None:  # outermost, so preflight requests are answered before any limit applies
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"])
    add_error_handlers(app)
    keyed = api_key is not None
    authorized = _security(keyed)
    scoring = _responses(*SCORING_STATUSES, keyed=keyed)
    keeping = scoring | {200: {"links": HANDLE_LINKS}}

    async def run(
        request: Request, plan: Callable[[Checker], Queued], count: int, param: str, timeout: float | None
    ) -> tuple[list[ScoringJob], list[EngineRequest]]:
        # What costs nothing is checked first; tokenising (and queueing, part by part) runs in the bounded pool,
        # never on the event loop.
        _refuse_early(prm, count, param, max_items_per_request, shutdown)
        submitted = time.perf_counter()
        jobs, futures = await _queued(prm, tokenizers, lambda: _planned(plan, param, limit))
        for future in futures:
            future.add_done_callback(lambda f: _observe_finished(f, metrics, submitted))
        return jobs, await _run(prm, request, jobs, futures, timeout, shutdown)

    @app.post("/v1/score", response_model=ScoreResponse, responses=keeping, dependencies=authorized)
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """Score items (results in item order); lower priority values run first; `keep` returns node handles."""
        items = [item.to_item() for item in body.items]
        plan = lambda check: prm.plan_and_submit(items, body.priority, body.keep, check)  # noqa: E731
        jobs, done = await run(request, plan, len(items), "items", _timeout(body.timeout))
        return _score_response(await _collected(prm, jobs, done), body.aggregate)

    @app.post("/v1/extend", response_model=ScoreResponse, responses=keeping | _responses(404), dependencies=authorized)
    async def extend(body: ExtendRequest, request: Request) -> ScoreResponse:
        """Score children of a kept node; each result's `step_rewards` are the node's then the child's new steps'."""
        plan = lambda check: _submitted(prm, check, prm.plan_extend(body.handle, body.children, body.priority, body.keep))  # noqa: E731
        jobs, done = await run(request, plan, len(body.children), "children", _timeout(body.timeout))
        return _score_response(await _collected(prm, jobs, done), body.aggregate)

    async def score_items(request: Request, items: list[dict[str, Any]], param: str) -> list[ScoreResult]:
        jobs, done = await run(request, lambda check: prm.plan_and_submit(items, check=check), len(items), param, default_timeout)
        return await _collected(prm, jobs, done)

    add_rl_routes(app, score_items, authorized, scoring, names, rl_aggregate, APIError)

    add_sleep_routes(app, prm, authorized, _responses(422, 500, 503, keyed=keyed))
    releasing = _responses(*BODY_STATUSES, 400, keyed=keyed)

    @app.post("/v1/release", response_model=ReleaseResponse, responses=releasing, dependencies=authorized)
    async def release(body: ReleaseRequest) -> ReleaseResponse:
        """Let kept nodes go: their cached blocks become evictable."""
        return ReleaseResponse(released=prm.release(body.handles))

    def _timeout(asked: float | None) -> float | None:
        return asked if asked is not None else default_timeout

    @app.post("/pooling", response_model=PoolingResponse, responses=scoring | _responses(404), dependencies=authorized)
    async def pooling(body: PoolingRequest, request: Request) -> PoolingResponse:
        """vLLM-compatible pooling: one `[1 - reward, reward]` row per step of each input (raw head outputs without activation)."""
        if body.model is not None and body.model not in names:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {' or '.join(map(repr, names))}", "not_found", "model")
        if body.task is not None and body.task not in POOLING_TASKS:
            raise FieldError(InvalidInputError(f"task {body.task!r} is not served; use one of {', '.join(POOLING_TASKS)}"), "task")
        param = "messages" if body.messages is not None else "input"
        items = _pooling_items(prm, body)
        plan = lambda check: prm.plan_and_submit(items, body.priority, check=check)  # noqa: E731
        jobs, done = await run(request, plan, len(items), param, default_timeout)
        rows = await asyncio.to_thread(_pooling_rows, prm, jobs, done, body.activated)
        prompt_tokens = _total(r.usage for r in done).prompt_tokens
        return PoolingResponse(
            id=f"pool-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or names[0],
            data=[PoolingData(index=i, data=_encoded(r, body)) for i, r in enumerate(rows)],
            usage=PoolingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )

    @app.get("/v1/models", response_model=ModelList, responses=_responses(keyed=keyed), dependencies=authorized)
    async def models() -> ModelList:
        """The served model, one card per served name (OpenAI-style list)."""
        return ModelList(data=[ModelCard(id=name, created=created, format=prm.format_name, max_model_len=limit) for name in names])

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness; open even when an API key is set."""
        return Health(model=names[0], pending=pending_requests(prm))

    @app.get("/ping", response_class=Response, operation_id="ping")
    @app.post("/ping", response_class=Response, operation_id="ping_post")
    async def ping() -> Response:
        """vLLM's (SageMaker's) liveness probe: 200 with an empty body; open even when an API key is set."""
        return Response(status_code=200)

    @app.get("/version", response_model=Version)
    async def version() -> Version:
        """The running prmserve's version."""
        return Version(version=prmserve_version())

    metrics_keyed = keyed and protect_metrics

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}} | _responses(keyed=metrics_keyed),
             dependencies=_security(metrics_keyed))
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of this app's registry."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def effective_max_model_len(prm: PRM, asked: int | None) -> int:
    """The longest input served: `asked` (--max-model-len), which may not exceed what the model and KV pool take."""
    if asked is None:
        return prm.max_model_len
    if not 1 <= asked <= prm.max_model_len:
        raise ValueError(f"--max-model-len {asked} must be between 1 and {prm.max_model_len} (this model's context, bounded by the KV pool)")
    return asked


def prmserve_version() -> str:
    """`prmserve.__version__`, or the installed distribution's version where the package has none."""
    import prmserve

    version = getattr(prmserve, "__version__", None)
    if version is None:
        from importlib.metadata import version as distribution_version

        version = distribution_version("prmserve")
    return version


def _add_auth(app: FastAPI, api_key: str, protect_metrics: bool) -> None:
    """The key on every path but the probes, the page and the assets, and unless `protect_metrics` the metrics and docs."""
    if protect_metrics:
        open_paths, open_prefixes = OPEN_PATHS, (UI_ASSETS_PATH + "/",)
    else:
        open_paths, open_prefixes = OPEN_PATHS + DOCS_PATHS, (UI_ASSETS_PATH + "/", DOCS_ASSETS_PATH + "/")
    app.add_middleware(AuthMiddleware, api_key=api_key, open_paths=open_paths, open_prefixes=open_prefixes)


def _security(keyed: bool) -> list:
    """The Bearer scheme in a route's OpenAPI schema when the server has a key (AuthMiddleware checks it); none without."""
    return [Depends(HTTPBearer(auto_error=False, description="The server's API key"))] if keyed else []


def _responses(*statuses: int, keyed: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses with the error body for `statuses`, and 401 when the route needs the key."""
    return {status: {"model": ErrorResponse} for status in sorted({*statuses, *((401,) if keyed else ())})}


def _refuse_early(prm: PRM, count: int, param: str, max_items: int, shutdown: Shutdown) -> None:
    """Refusals that cost nothing, before any tokenising: the server stopping or asleep (503), more items than a request
    or the queue may ever hold (400 naming `param`), no room in the queue now (429)."""
    if shutdown.begun.reached:
        raise APIError(503, "the server is shutting down; retry on another instance", "shutting_down", retry_after=RETRY_AFTER_S)
    if prm.is_sleeping:
        raise EngineSleepingError("the engine is asleep (POST /sleep): it takes work again after POST /wake_up; retry later")
    if count > max_items:
        raise blamed(InvalidInputError(f"{count} items in one request; this server takes at most {max_items}"), param)
    room = prm.engine.config.max_queue
    if room is None:
        return
    if count > room:
        raise blamed(InvalidInputError(f"{count} requests at once can never fit the queue of {room}; split them"), param)
    pending = prm.num_pending
    if pending + count > room:
        raise QueueFullError(f"the engine is busy: {pending} requests are pending; {count} more exceed the limit of {room}; retry later")


def _pooling_items(prm: PRM, body: PoolingRequest) -> list[dict[str, Any]]:
    """`input` or `messages` as `PRM.encode` items."""
    if body.messages is not None:
        try:
            return [{"text": render_chat(prm.tokenizer, [m.to_message() for m in body.messages])}]
        except Exception as exc:  # no template, or the checkpoint's template refused these messages (jinja raise)
            kind = type(exc) if isinstance(exc, FormatError) else InvalidInputError
            raise blamed(kind(f"the chat template could not render them: {exc}"), "messages") from None
    given = body.input
    if isinstance(given, str):
        return [{"text": given}]
    if all(isinstance(x, int) for x in given):
        return [{"token_ids": given}]
    return [{"text": x} if isinstance(x, str) else {"token_ids": x} for x in given]


def _planned(plan: Callable[[Checker], Queued], param: str, max_model_len: int) -> Queued:
    """Encode a request's items into jobs and queue them; a refusal is a 400 naming the field and the item's index
    (404 for an unknown node handle), 429 for a full queue."""

    def check(jobs: list[ScoringJob], first_index: int) -> None:
        for index, job in enumerate(jobs, start=first_index):
            if len(job.encoded.token_ids) > max_model_len:
                message = f"item {index}: the input is {len(job.encoded.token_ids)} tokens; this server takes at most {max_model_len}"
                raise blamed(InputTooLongError(message), param)

    try:
        return plan(check)
    except HandleNotFoundError as exc:
        raise FieldError(exc, "handle") from None
    except (InvalidInputError, FormatError) as exc:  # a bad item, or more of them than the queue can ever hold
        raise blamed(exc, param) from None


async def _queued(prm: PRM, pool: ThreadPoolExecutor, work: Callable[[], Queued]) -> Queued:
    """Run `work` (plan and queue) in the pool; if the caller is cancelled meanwhile, what it queues is dropped."""
    pending = asyncio.get_running_loop().run_in_executor(pool, work)
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        pending.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or prm.drop(*f.result()))
        raise


def _score_response(results: list[ScoreResult], method: str) -> ScoreResponse:
    bodies = [
        ScoreResultBody(step_rewards=r.step_rewards, aggregate=aggregate(r.step_rewards, method), usage=_usage(r.usage),
                        handle=r.handle, step_spans=r.step_spans)
        for r in results
    ]
    return ScoreResponse(results=bodies, usage=_usage(_total(r.usage for r in results)))


async def _collected(prm: PRM, jobs: list[ScoringJob], done: list[EngineRequest]) -> list[ScoreResult]:
    """`prm.collect` in a worker thread: it waits for the GPU to finish the step, which the event loop must not."""
    return await asyncio.to_thread(prm.collect, jobs, done)


async def _expire_handles(prm: PRM) -> None:
    """Let expired node handles go even when no call touches the table (clients that vanished)."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        prm.nodes.expire()


async def _run(
    prm: PRM, request: Request, jobs: Sequence[ScoringJob], futures: list[Future], timeout: float | None, shutdown: Shutdown,
) -> list[EngineRequest]:
    """Wait for every queued job, the timeout, the client leaving, or the shutdown's bound; drop the work unless done.

    The engine's refusals (too long for the KV pool, shutting down) propagate to the app's handlers.
    """
    finished = False
    gathered = all_done(futures)  # cancelled below unless it is the outcome, so no error goes unread
    try:
        left = asyncio.ensure_future(_client_left(request))
        expired = asyncio.ensure_future(shutdown.expired.wait())
        try:
            done, _ = await asyncio.wait({gathered, left, expired}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            expired.cancel()
        if gathered in done:
            requests = gathered.result()  # the engine's refusal, if any, raised
            finished = True
            return requests
        if left in done:
            raise APIError(CLIENT_CLOSED, "the client closed the connection; its work was dropped", "client_closed")
        if expired in done:
            message = "the server is shutting down and this work did not finish within its bound; it was dropped"
            raise APIError(503, message, "shutting_down", retry_after=RETRY_AFTER_S)
        raise APIError(504, f"not finished within the timeout of {timeout} s; the work was dropped", "timeout", "timeout")
    finally:
        gathered.cancel()
        for f in futures:
            f.cancel()  # no-op for finished work; aborts and frees the rest
        if not finished:
            prm.abandon(jobs)  # kept nodes whose handles will never be returned


def _submitted(prm: PRM, check: Checker, jobs: list[ScoringJob]) -> Queued:
    """Vet planned jobs, then queue them together."""
    check(jobs, 0)
    return jobs, prm.submit_jobs(jobs)


async def _client_left(request: Request) -> None:
    """Return when the client disconnects (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _observe_finished(future: Future, metrics: ServerMetrics, submitted: float) -> None:
    """Engine-thread callback: a scored input counts as a vLLM request success with its end-to-end latency
    and its queue time."""
    if not future.cancelled() and future.exception() is None:
        metrics.observe_finished(time.perf_counter() - submitted, future.result().queue_seconds)


def _pooling_rows(prm: PRM, jobs: list[ScoringJob], done: list[EngineRequest], activated: bool) -> list[list[list[float]]]:
    """Rows per step of each input: `[1 - reward, reward]`, or with the activation off the head's raw outputs there."""
    if activated:
        return [[[1.0 - r, r] for r in result.step_rewards] for result in prm.collect(jobs, done)]
    with reading(done):
        return [request.outputs.float().tolist() for request in done]


def _encoded(rows: list[list[float]], body: PoolingRequest) -> list[list[float]] | str:
    """The rows as the request's `encoding_format` asks: JSON floats, or vLLM's base64."""
    if body.encoding_format == "float":
        return rows
    return rows_to_base64(rows, body.embed_dtype, body.endianness)


def _total(usages: Iterable[TokenUsage]) -> TokenUsage:
    return sum(usages, TokenUsage())


def _usage(usage: TokenUsage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, computed_tokens=usage.computed_tokens, cached_tokens=usage.cached_tokens)
