"""`PRM`: load a process reward model and score (problem, steps) items, offline or from async code."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prmserve.completions import DEFAULT_STEP_SPLIT, chat_to_completion, split_completion, split_rule
from prmserve.engine import Engine, EngineConfig, EngineLoop, Request
from prmserve.engine.futures import all_done
from prmserve.engine.request import new_request_id
from prmserve.engine.readout import reading
from prmserve.engine.sleep import SleepReport
from prmserve.errors import (
    CheckpointError, FormatError, HandleNotFoundError, InputTooLongError, InvalidInputError, QueueFullError,
)
from prmserve.formats import EncodedItem, detect_format, make_format
from prmserve.formats.base import attempt
from prmserve.models import BackboneConfig, load_reward_model, resolve_checkpoint
from prmserve.models.attention import TORCH_SDPA, choose_backend
from prmserve.models.invariant import request_cublas_invariance, rows_invariant
from prmserve.models.loader import CheckpointTensors
from prmserve.nodes import Node, NodeTable, leading_keys
from prmserve.parallel.sharding import check_tensor_parallel_size
from prmserve.recent_encodings import Recent, RecentEncodings, prefix_keys
from prmserve.results import ScoreResult, TokenUsage
from prmserve.same_tick import SameTickBatcher
from prmserve.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from prmserve.parallel.workers import TensorParallelWorkers

BUNDLED_MODEL = Path(__file__).parent / "bundled" / "small-prm"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ENGINE_OPTIONS = set(EngineConfig.__dataclass_fields__)
# Options of the PRM itself (node handles for tree search), with their defaults.
_PRM_OPTIONS = {"handle_ttl": 600.0, "max_handles": 4096, "recent_encodings": 1024, "step_split": DEFAULT_STEP_SPLIT}


@dataclass
class ScoringJob:
    """One item on its way through the engine: its encoding, its request, what its result is built from."""

    encoded: EncodedItem
    request: Request
    parent: Node | None = None  # extend: the node whose rewards come first
    node_text: tuple[str, tuple[str, ...]] | None = None  # keep: (problem, steps) of the node it becomes
    step_spans: list[tuple[int, int]] | None = None  # a completion's steps, as characters of it
    earlier: list[Request] = field(default_factory=list)  # formats scoring each step prefix alone: the shorter ones

    @property
    def requests(self) -> list[Request]:
        """Every request of the job, in step order (the job's own request last)."""
        return [*self.earlier, self.request]


@dataclass(frozen=True)
class AsyncCall:
    """A `score_async` (items) or `extend_async` (handle, children) call waiting to be queued with its loop turn's others."""

    priority: int
    keep: bool
    items: Sequence[Mapping[str, Any]] | None = None
    handle: str | None = None
    children: Sequence[Sequence[str]] | None = None


class PRM:
    """A process reward model ready to score: its format, weights, tokenizer and engine.

    `PRM()` loads the small model bundled with prmserve; otherwise pass a local checkpoint
    directory or a Hugging Face model ID (`revision`, `download_dir`; `tokenizer` loads another
    checkpoint's tokenizer). `deterministic` (default): an item's rewards are bit-identical whatever it
    is batched with or how much of it was cached (`prmserve.models.invariant`). On CUDA the layers are compiled and small steps replay CUDA graphs,
    unless `enforce_eager`; `attention_backend` picks the attention kernel (TRITON_ATTN, FLASH_ATTN, TORCH_SDPA;
    default: the fastest that runs here). `tensor_parallel_size=N` splits the model over N GPUs (N processes on the
    CPU): this process is rank 0 and starts the others; `close()` (or leaving a `with` block) stops them.
    Keyword options are the engine's (`EngineConfig`: `enable_prefix_caching`,
    `max_num_batched_tokens`, ...), the node handles' (`handle_ttl` seconds, `max_handles`), and
    then the format's.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        format: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        enforce_eager: bool = False,
        revision: str | None = None,
        download_dir: str | Path | None = None,
        tokenizer: str | Path | None = None,
        tensor_parallel_size: int = 1,
        deterministic: bool = True,
        attention_backend: str | None = None,
        **options: Any,
    ) -> None:
        self.model_name = str(model) if model is not None else "prmserve/small-prm"
        if model is None and not (BUNDLED_MODEL / "config.json").is_file():
            raise CheckpointError(f"the bundled model is missing from this installation ({BUNDLED_MODEL}); pass a model")
        self.path = resolve_checkpoint(model if model is not None else BUNDLED_MODEL, revision, download_dir)
        self.config = BackboneConfig.from_file(self.path)
        # The tokenizer (and chat template) of another directory or hub ID, as vLLM's --tokenizer.
        self.tokenizer = load_tokenizer(self.path if tokenizer is None else resolve_checkpoint(tokenizer, None, download_dir))
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.config, self.device)
        self.tensor_parallel_size = check_tensor_parallel_size(tensor_parallel_size, self.config)
        backend = choose_backend(self.device, self.dtype, self.config.head_dim, attention_backend)
        engine_options = {k: options.pop(k) for k in list(options) if k in _ENGINE_OPTIONS}
        own = {k: options.pop(k, default) for k, default in _PRM_OPTIONS.items()}
        self.format_name = format or detect_format(self.config, _tensor_names_if_needed(self.path, self.config), self.model_name)
        self.format = make_format(self.format_name, self.tokenizer, self.config, **options)
        engine_config = EngineConfig(**engine_options)  # checked before any worker starts
        self.compiled = self.device.type == "cuda" and not enforce_eager
        self.workers: TensorParallelWorkers | None = None
        if deterministic and self.device.type == "cuda":
            request_cublas_invariance()  # before this process's first matmul, or it has no effect
        if self.tensor_parallel_size == 1:
            self.model = load_reward_model(self.path, self.config, self.format.head, self.device, self.dtype)
        else:  # the other ranks' processes, and this one's part of the model
            from prmserve.parallel.launch import start_tensor_parallel

            self.workers, self.model = start_tensor_parallel(
                self.path, self.config, self.format.head, self.device, self.dtype, self.tensor_parallel_size, self.compiled,
                backend)
        self.model.set_attention_kernel(backend)
        if deterministic and self.device.type != "cuda":
            self.model.use_blocked_kernels()
        # Measured, not assumed: False (and a warning) where this process's matmuls still vary with batching.
        self.deterministic = deterministic and rows_invariant(self.model, self.device, self.dtype)
        if self.compiled:
            self.model.compile_layers()  # fuses norms, rotary, SwiGLU; measured in bench/
        try:
            self.engine = Engine(self.model, engine_config, self.workers)
            if self.device.type == "cuda":  # compile and size memory now, not in the first big call
                self.engine.runner.warmup(self.engine.config.max_num_batched_tokens)
                # Small steps replay captured graphs (one rank only: a graph cannot hold the workers' steps).
                if not enforce_eager and backend != TORCH_SDPA and self.workers is None:
                    same_layers = self.engine.capture_graphs(self.engine.config.max_num_seqs)
                    self.deterministic = self.deterministic and same_layers
        except BaseException:
            if self.workers is not None:
                self.workers.close()
            raise
        self._loop: EngineLoop | None = None
        self._loop_lock = threading.Lock()
        self._set_up_calls(own)
        # Loading leaves a large heap half-way through the collector's generations: the first big call would pay a
        # full pass over it (~0.2 s on a CPU, more with CUDA and Inductor loaded). Pay it here, at load, instead.
        gc.collect()

    def _set_up_calls(self, own: Mapping[str, Any]) -> None:
        """What the scoring calls keep between calls (`_PRM_OPTIONS`): node handles, recent encodings, the step split."""
        self.nodes = NodeTable(own["handle_ttl"], own["max_handles"], on_drop=self._unpin)
        self.recent = RecentEncodings(own["recent_encodings"])
        self.step_split = split_rule(own["step_split"])  # how completions are split when an item does not say
        # Async calls of one event-loop turn (a search's gather over a level) are planned and queued together.
        self._same_tick = SameTickBatcher(self._plan_and_submit_calls, lambda planned: self.drop(*planned))
        # ... and those whose requests finished by the same turn are collected together (one rewards operation).
        self._collect_tick = SameTickBatcher(self._collect_calls, self._discard_results, lambda call: self.abandon(call[0]))

    @property
    def max_model_len(self) -> int:
        """Longest input accepted: the model's context, bounded by what the KV pool can hold."""
        return min(self.config.max_position_embeddings, self.engine.max_tokens_per_request)

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet finished (0 before the engine thread starts)."""
        return self._loop.num_pending if self._loop is not None else 0

    @property
    def loop(self) -> EngineLoop:
        """The engine thread, started on first use (under a lock: one thread, however many callers)."""
        if self._loop is None:
            with self._loop_lock:
                if self._loop is None:
                    self._loop = EngineLoop(self.engine)
        return self._loop

    def encode(self, item: Mapping[str, Any]) -> EncodedItem:
        """Token ids and read positions for one item: {problem, steps}, {problem, completion}, {messages},
        or pre-formatted {text} / {token_ids}."""
        entry = self._encodings([item])[0]
        if isinstance(entry, Exception):
            raise entry
        return entry[0]

    def steps_of(self, item: Mapping[str, Any]) -> tuple[str, list[str], list[tuple[int, int]] | None] | None:
        """(problem, steps, spans) of an item given as steps, a completion or a chat; None for pre-formatted input.

        A completion (or a chat's last assistant turn) is split by the item's `step_split`, else the
        PRM's (`"\n\n"` by default); `spans` are the steps' [start, end) characters in it.
        """
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"an item must be a mapping with 'problem' and 'steps', not {type(item).__name__}")
        kinds = [k for k in ("steps", "completion", "messages", "text", "token_ids") if k in item]
        if len(kinds) != 1:
            raise InvalidInputError("an item needs exactly one of: problem + steps, problem + completion, messages, text, token_ids")
        if "step_split" in item and kinds[0] not in ("completion", "messages"):
            raise InvalidInputError("'step_split' applies to 'completion' and 'messages' items only")
        if kinds[0] == "steps":
            return item.get("problem"), item["steps"], None
        if kinds[0] in ("text", "token_ids"):
            return None
        if kinds[0] == "messages":
            if "problem" in item:
                raise InvalidInputError("a 'messages' item takes its problem from the user turn: drop 'problem'")
            problem, completion = chat_to_completion(item["messages"])
        else:
            problem, completion = item.get("problem"), item["completion"]
        rule = split_rule(item["step_split"]) if "step_split" in item else self.step_split
        steps, spans = split_completion(completion, rule)
        if not steps:
            raise InvalidInputError("the completion holds no step: every piece between separators is empty")
        return problem, steps, spans

    def _encode_preformatted(self, item: Mapping[str, Any]) -> EncodedItem:
        """The encoding of a {text} or {token_ids} item."""
        if "text" in item:
            if not isinstance(item["text"], str) or not item["text"]:
                raise InvalidInputError("'text' must be a non-empty string")
            self.format.check_text(item["text"], "'text'")
            encoded = self.format.encode_text(item["text"])
        else:
            encoded = self.format.encode_token_ids(self._checked_ids(item["token_ids"]))
        return self._checked_length(encoded)

    def _checked_length(self, encoded: EncodedItem) -> EncodedItem:
        if not encoded.read_positions:
            raise InvalidInputError(f"the input has no step to score (no {self.format_name} separator found)")
        if len(encoded.token_ids) > self.max_model_len:
            raise InputTooLongError(f"the input is {len(encoded.token_ids)} tokens; this model takes at most {self.max_model_len}")
        return encoded

    def _checked_ids(self, token_ids: Any) -> list[int]:
        vocab = self.config.vocab_size
        if not isinstance(token_ids, Sequence) or isinstance(token_ids, str) or not token_ids:
            raise InvalidInputError("'token_ids' must be a non-empty list of integers")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise InvalidInputError(f"'token_ids' must be integers in [0, {vocab})")
        return list(token_ids)

    def _encode_items(self, items: Sequence[Mapping[str, Any]], first_index: int = 0) -> list[tuple[EncodedItem, tuple | None, tuple]]:
        """Each item's encoding, its (problem, steps, spans) when it has steps, and its (parent, own) recent entries
        (`_encodings`); the lowest bad item's error is raised, naming it by its index plus `first_index`."""
        _check_item_list(items)
        out = self._encodings(items)
        for index, entry in enumerate(out):
            if isinstance(entry, Exception):
                raise type(entry)(f"item {index + first_index}: {entry}") from None
        return out

    def _encodings(self, items: Sequence[Any]) -> list[Any]:
        """(encoding, parts, (parent, own)) of each item, or its input error, with the tokenizer called in batches:
        problem + steps items that need a whole encoding in one (`PRMFormat.encode_many`), the new steps of those
        that extend a prefix encoded recently in another (the rest of their ids are the recent encoding's).
        `parent`: the recent entry the item extends (or repeats), whose request's prefix-cache keys its request can
        continue; `own`: the item's entry, for its request to be attached to (either None where there is none)."""
        out: list[Any] = [None] * len(items)
        fresh: list[tuple[int, tuple, list[int] | None]] = []  # (index, parts, prefix keys)
        grown: list[tuple[int, tuple, list[int], tuple[int, Recent]]] = []  # (index, parts, keys, recent hit)
        for index, item in enumerate(items):
            try:
                parts = self.steps_of(item)
                if parts is None:
                    out[index] = (self._encode_preformatted(item), None, (None, None))
                elif not self.format.extendable:
                    fresh.append((index, parts, None))
                else:
                    problem, steps = parts[0], parts[1]
                    # A recent entry's problem and first steps are this very text, checked when it was encoded, and
                    # `extend` checks the new steps: so a hit skips the item's checks (host work that would grow
                    # with what the prefix holds).
                    plain = isinstance(problem, str) and isinstance(steps, (list, tuple)) and all(type(t) is str for t in steps)
                    keys = prefix_keys(problem, steps) if plain else None
                    hit = self.recent.longest_prefix(problem, steps, keys) if plain else None
                    if hit is None:
                        self.format.check_item(problem, steps)
                        fresh.append((index, parts, keys))
                    elif hit[0] == len(steps):
                        out[index] = (self._checked_length(hit[1].encoded), parts, (hit[1], hit[1]))
                    else:
                        grown.append((index, parts, keys, hit))
            except (InvalidInputError, FormatError) as exc:
                out[index] = exc
        encodings = self.format.encode_many([(parts[0], parts[1]) for _, parts, _ in fresh])
        known = self.format.boundary_ids([(parts[1][k - 1], parts[1][k:]) for _, parts, _, (k, _) in grown])
        for (index, parts, keys), encoded in zip(fresh, encodings):
            out[index] = self._remembered(encoded, parts, keys)
        for index, parts, keys, (k, node) in grown:
            encoded = attempt(self.format.extend, node.encoded, parts[0], parts[1][:k], parts[1][k:], known)
            out[index] = self._remembered(encoded, parts, keys, node)
        return out

    def _remembered(self, encoded: EncodedItem | Exception, parts: tuple, keys: list[int] | None,
                    parent: Recent | None = None) -> tuple | Exception:
        """(encoding, parts, (parent, own)) of a steps item, added to the recent encodings; an error passes through."""
        if isinstance(encoded, Exception):
            return encoded
        own = self.recent.add(parts[0], parts[1], keys[-1], encoded) if keys is not None else None
        checked = attempt(self._checked_length, encoded)
        return checked if isinstance(checked, Exception) else (checked, parts, (parent, own))

    # Scoring in three steps (plan, submit, collect), shared by the blocking, async and HTTP fronts.

    def plan_score(
        self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False, first_index: int = 0
    ) -> list[ScoringJob]:
        """Encode items into engine requests; `keep` pins each item's tokens for `extend`. Errors name an item by
        its index plus `first_index` (a part of a bigger call)."""
        if keep and not self.format.extendable:
            raise FormatError(f"format {self.format_name!r} cannot keep nodes: keep/extend need per-step rewards read from one sequence")
        if hasattr(self.format, "prefixes"):
            return self._plan_prefixes(items, priority)
        jobs = []
        block_size = self.engine.blocks.block_size
        for index, (encoded, parts, (parent, own)) in enumerate(self._encode_items(items, first_index), start=first_index):
            if keep and (parts is None or encoded.body_len is None):
                raise InvalidInputError(f"item {index}: keep=True needs a problem + steps item (pre-formatted input cannot be extended)")
            # A re-sent prefix's cache keys come from the request that carried it: the engine hashes new blocks only.
            hashes = parent.hashes_for(encoded, block_size) if parent is not None else None
            request = _request(encoded.token_ids, encoded.read_positions, priority, block_hashes=hashes,
                               keep_tokens=encoded.body_len if keep else 0)
            if own is not None and own.keys is None:
                own.request = request
            node_text = (parts[0], tuple(parts[1])) if keep else None
            jobs.append(ScoringJob(encoded, request, node_text=node_text, step_spans=parts[2] if parts else None))
        return jobs

    def _plan_prefixes(self, items: Sequence[Mapping[str, Any]], priority: int) -> list[ScoringJob]:
        """Jobs of a format that scores every step prefix as its own sequence (Universal-PRM): one request per
        step, all queued together so the prefix cache computes the shared question and steps once."""
        _check_item_list(items)
        jobs = []
        for index, item in enumerate(items):
            try:
                parts = self.steps_of(item)
                if parts is None:
                    prefixes = [self._encode_preformatted(item)]
                else:
                    prefixes = [self._checked_length(e) for e in self.format.prefixes(parts[0], parts[1])]
            except (InvalidInputError, FormatError) as exc:
                raise type(exc)(f"item {index}: {exc}") from None
            requests = [_request(e.token_ids, e.read_positions, priority) for e in prefixes]
            jobs.append(ScoringJob(prefixes[-1], requests[-1], step_spans=parts[2] if parts else None, earlier=requests[:-1]))
        return jobs

    def plan_extend(
        self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False,
        known: Mapping[str, list[int]] | None = None,
    ) -> list[ScoringJob]:
        """Requests for children of a kept node: each child is the node's steps then its own new steps.

        Only the new steps are tokenised (all children's in one batch, or `known`: tokenised ahead with other
        calls' children); the node's ids and prefix-cache keys are reused.
        """
        node = self.nodes.get(handle)
        if not _is_step_lists(children):
            raise InvalidInputError("'children' must be a non-empty list of lists of new steps")
        block_size = self.engine.blocks.block_size
        if known is None:
            known = self.format.encode_boundaries(node.steps[-1], children)  # every child's new text in one batch
        jobs = []
        for index, steps in enumerate(children):
            try:
                if isinstance(steps, str) or not isinstance(steps, Sequence):
                    raise InvalidInputError("a child is a list of new steps, not a string")
                encoded = self._checked_length(self.format.extend(node.encoded, node.problem, node.steps, steps, known))
            except (InvalidInputError, FormatError) as exc:
                raise type(exc)(f"child {index}: {exc}") from None
            hashes = leading_keys(node.encoded, node.block_hashes, encoded, block_size)
            own = 0 if self.format.rescores_node_on_extend else len(node.encoded.read_positions)  # else the node's rewards are kept
            request = _request(encoded.token_ids, encoded.read_positions[own:], priority, block_hashes=hashes,
                               keep_tokens=encoded.body_len if keep else 0)
            text = (node.problem, node.steps + tuple(steps)) if keep else None
            jobs.append(ScoringJob(encoded, request, parent=node, node_text=text))
        return jobs

    def submit_jobs(self, jobs: Sequence[ScoringJob]) -> list[Future]:
        """Queue the jobs' requests together: admitted whole or refused whole (QueueFullError)."""
        return self.loop.submit_requests([request for job in jobs for request in job.requests])

    def plan_and_submit(
        self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False,
        check: Callable[[list[ScoringJob], int], None] | None = None,
    ) -> tuple[list[ScoringJob], list[Future]]:
        """`plan_score` then `submit_jobs`; a big call goes in growing parts, so the GPU starts on the first part
        while the rest are tokenised (512 cold items take ~0.13 s to tokenise on two cores, in one batch). Admitted or refused as
        a whole (the queue's room is reserved first); an error in a later part cancels what was queued.
        `check(jobs, first_index)` vets each part before it is queued (the server's own length limit)."""
        _check_item_list(items)
        reserve = getattr(self.loop, "reserve", None)  # a RoutedPRM's replica pool queues a call whole
        if len(items) <= STREAM_AFTER or hasattr(self.format, "prefixes") or reserve is None:
            jobs = self.plan_score(items, priority, keep)
            if check is not None:
                check(jobs, 0)
            return jobs, self.submit_jobs(jobs)
        jobs, futures = [], []
        with reserve(len(items)) as room:
            try:
                for start, end in _parts(len(items)):
                    part = self.plan_score(items[start:end], priority, keep, first_index=start)
                    if check is not None:
                        check(part, start)
                    futures += room.submit([request for job in part for request in job.requests])
                    jobs += part
            except BaseException:
                self.drop(jobs, futures)
                raise
        return jobs, futures

    def collect(self, jobs: Sequence[ScoringJob], finished: Sequence[Request]) -> list[ScoreResult]:
        """Results of finished jobs: every reward in one batched operation; kept ones become nodes."""
        return self._results(jobs, finished, self._row_rewards(finished))

    def _collect_calls(self, calls: list[tuple[list[ScoringJob], list[Request]]]) -> list[list[ScoreResult]]:
        """`collect` for several calls at once (async calls whose requests finished by one loop turn): one rewards
        operation and one copy to the host for all, where each call alone took ~0.3 ms (H100)."""
        rewards = self._row_rewards([r for _, finished in calls for r in finished])
        outcomes, start = [], 0
        for jobs, finished in calls:
            count = sum(len(r.read_positions) for r in finished)
            outcomes.append(self._results(jobs, finished, rewards[start : start + count]))
            start += count
        return outcomes

    def _row_rewards(self, finished: Sequence[Request]) -> list[float]:
        """One reward per read position of the finished requests, in order (waiting only for their steps)."""
        if not finished:
            return []
        with reading(finished):  # not waiting for steps launched after these
            return self.format.rewards(torch.cat([r.outputs for r in finished]))

    def _results(self, jobs: Sequence[ScoringJob], finished: Sequence[Request], rewards: list[float]) -> list[ScoreResult]:
        """The jobs' results from their requests' row rewards; kept ones become nodes."""
        results, start, taken = [], 0, 0
        for job in jobs:
            mine = finished[taken : taken + len(job.requests)]
            taken += len(mine)
            request = mine[-1]
            count = sum(len(r.read_positions) for r in mine)
            step_rewards = self.format.step_rewards(rewards[start : start + count], job.encoded)
            start += count
            if job.parent is not None and not self.format.rescores_node_on_extend:
                step_rewards = job.parent.step_rewards + step_rewards
            handle = None
            if job.node_text is not None:
                handle = request.request_id  # the engine pinned the node's blocks under this key
                problem, steps = job.node_text
                self.nodes.add(handle, Node(problem, steps, job.encoded, step_rewards, request.block_hashes))
            results.append(ScoreResult(step_rewards, sum((r.usage for r in mine), TokenUsage()), handle, job.step_spans))
        return results

    def _discard_results(self, results: list[ScoreResult]) -> None:
        """Collected results whose caller was cancelled before taking them: their kept nodes go."""
        self.release([r.handle for r in results if r.handle is not None])

    def abandon(self, jobs: Sequence[ScoringJob]) -> None:
        """Unpin what kept jobs pinned when their results will never be collected (an error, a cancel)."""
        for job in jobs:
            if job.node_text is not None:
                self._unpin(job.request.request_id)

    # The public scoring calls --------------------------------------------------------------------

    def score(
        self, items: Sequence[Mapping[str, Any]], priority: int = 0, progress: bool = False, keep: bool = False
    ) -> list[ScoreResult]:
        """Score items (results in item order); all are queued at once so shared prefixes are computed once.

        `keep=True` gives each result a `handle`: its tokens stay cached for `extend` until `release`.
        """
        return self._wait(*self.plan_and_submit(items, priority, keep), progress)

    def extend(
        self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False
    ) -> list[ScoreResult]:
        """Score children of a kept node (each a list of new steps); a child's `step_rewards` are the
        node's then its new steps', exactly as scoring the whole item would give them."""
        jobs = self.plan_extend(handle, children, priority, keep)
        return self._wait(jobs, self.submit_jobs(jobs), False)

    async def score_async(self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False) -> list[ScoreResult]:
        """Like `score`, for asyncio callers; cancelling the awaiting task aborts the queued work. Calls made in
        one event-loop turn (`asyncio.gather`) are queued together, so the engine schedules them as one batch."""
        _check_item_list(items)
        if len(items) > STREAM_AFTER:  # a big call goes in parts on its own
            return await self._wait_async(*self.plan_and_submit(items, priority, keep))
        return await self._wait_async(*await self._same_tick(AsyncCall(priority, keep, items=items)))

    async def extend_async(
        self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False
    ) -> list[ScoreResult]:
        """Like `extend`, for asyncio callers; the calls of one event-loop turn are tokenised and queued together."""
        return await self._wait_async(*await self._same_tick(AsyncCall(priority, keep, handle=handle, children=children)))

    def _plan_and_submit_calls(self, calls: list[AsyncCall]) -> list[tuple[list[ScoringJob], list[Future]] | Exception]:
        """Plan the calls (each part's extend children tokenised in one batch) and queue them together. A turn of more
        than `STREAM_AFTER` children and items goes in growing parts of whole calls against one reservation, so the
        GPU starts on the first part while the rest are tokenised, as a big `score` call does. Where the queue refuses
        the whole, each call is queued alone, so each gets its own outcome."""
        units = sum(_call_size(call) for call in calls)
        reserve = getattr(self.loop, "reserve", None)  # a RoutedPRM's replica pool queues a call whole
        if units <= STREAM_AFTER or reserve is None or hasattr(self.format, "prefixes"):
            planned = self._plan_calls(calls)
            try:
                return _submitted_together(planned, self.loop.submit_requests)
            except (QueueFullError, InvalidInputError):
                return self._each_alone(planned)
        try:
            room = reserve(units)
        except (QueueFullError, InvalidInputError):
            return self._each_alone(self._plan_calls(calls))
        outcomes: list[tuple[list[ScoringJob], list[Future]] | Exception] = []
        with room:
            for part in _call_parts(calls, units):
                planned = self._plan_calls(part)
                try:
                    outcomes += _submitted_together(planned, room.submit)
                except Exception as exc:  # the engine stopped or fell asleep: this part and the rest are refused
                    outcomes += [jobs if isinstance(jobs, Exception) else exc for jobs in planned]
                    return outcomes + [exc] * (len(calls) - len(outcomes))
        return outcomes

    def _plan_calls(self, calls: list[AsyncCall]) -> list[list[ScoringJob] | Exception]:
        """Each call's jobs, or the error that refuses it; the extends' children are tokenised in one batch."""
        known = self._boundaries([call for call in calls if call.handle is not None])
        planned: list[list[ScoringJob] | Exception] = []
        for call in calls:
            try:
                if call.handle is None:
                    planned.append(self.plan_score(call.items, call.priority, call.keep))
                else:
                    planned.append(self.plan_extend(call.handle, call.children, call.priority, call.keep, known))
            except Exception as exc:
                planned.append(exc)
        return planned

    def _each_alone(self, planned: list[list[ScoringJob] | Exception]) -> list[tuple[list[ScoringJob], list[Future]] | Exception]:
        """Queue each planned call on its own (the queue refused them together), so each gets its own outcome."""
        return [jobs if isinstance(jobs, Exception) else self._submitted_alone(jobs) for jobs in planned]

    def _submitted_alone(self, jobs: list[ScoringJob]) -> tuple[list[ScoringJob], list[Future]] | Exception:
        try:
            return jobs, self.submit_jobs(jobs)
        except (QueueFullError, InvalidInputError) as exc:
            return exc

    def _boundaries(self, extends: list[AsyncCall]) -> Mapping[str, list[int]]:
        """The boundary ids of every child of these calls (`plan_extend`'s `known`), in one tokenizer batch."""
        pairs = []
        for call in extends:
            try:
                last_step = self.nodes.get(call.handle).steps[-1]
            except HandleNotFoundError:
                continue  # plan_extend says so to its caller
            if _is_step_lists(call.children):
                pairs += [(last_step, steps) for steps in call.children]
        return self.format.boundary_ids(pairs)

    def release(self, handles: str | Sequence[str]) -> int:
        """Let kept nodes go (their blocks become evictable); the number of handles that existed."""
        return self.nodes.release([handles] if isinstance(handles, str) else handles)

    def _wait(self, jobs: list[ScoringJob], futures: list[Future], progress: bool) -> list[ScoreResult]:
        try:
            if progress:
                from tqdm import tqdm

                for _ in tqdm(as_completed(futures), total=len(futures), desc="scoring", unit="item"):
                    pass
            finished = [f.result() for f in futures]
        except BaseException:
            self.drop(jobs, futures)
            raise
        return self.collect(jobs, finished)

    async def _wait_async(self, jobs: list[ScoringJob], futures: list[Future]) -> list[ScoreResult]:
        try:
            finished = await all_done(futures)
        except BaseException:
            self.drop(jobs, futures)
            raise
        return await self._collect_tick((jobs, finished))

    def drop(self, jobs: Sequence[ScoringJob], futures: Sequence[Future]) -> None:
        """Queued work whose results will never be collected (an error, a cancel): abort it, unpin what was kept."""
        for f in futures:
            f.cancel()
        self.abandon(jobs)

    def _unpin(self, handle: str) -> None:
        if self._loop is not None:
            self._loop.unpin(handle)

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes and their rewards, kept nodes included: call after changing the weights."""
        self.nodes.clear()
        if self._loop is not None:
            self._loop.reset_prefix_cache()
        else:
            self.engine.reset_prefix_cache()

    # Sleep mode (vLLM's names), for sharing the GPU with a generator ------------------------------

    def sleep(self, level: int = 1) -> SleepReport:
        """Lend the device's memory out: new work is refused (EngineSleepingError) while what was submitted
        finishes, then the KV pool goes and the weights move to host memory (level 1) or are dropped (level 2).
        Node handles stay valid (their prefixes are computed again after waking)."""
        return self.loop.sleep(level)

    def wake_up(self) -> None:
        """Take the memory back: weights restored (reloaded from the checkpoint after level 2), a new KV pool."""
        self.loop.wake_up(lambda: load_reward_model(self.path, self.config, self.format.head, self.device, self.dtype))

    @property
    def is_sleeping(self) -> bool:
        """Whether `sleep` was called and `wake_up` not yet."""
        return self._loop is not None and self._loop.is_sleeping

    def close(self) -> None:
        """Finish queued work and stop the engine thread, then the tensor-parallel workers."""
        self.nodes.clear()
        if self._loop is not None:
            self._loop.shutdown()
            self._loop = None
        if self.workers is not None:
            self.workers.close()

    def __enter__(self) -> "PRM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A call of more items than this is planned and queued in parts of PART_SIZES (then the last size, repeated).
STREAM_AFTER = 64
PART_SIZES = (32, 64, 128, 256)


def _parts(count: int) -> list[tuple[int, int]]:
    """[start, end) of each part of a call of `count` items, growing: the first is small so the GPU starts soon."""
    bounds, start, sizes = [], 0, iter(PART_SIZES)
    size = PART_SIZES[0]
    while start < count:
        size = next(sizes, size)  # the last size repeats
        bounds.append((start, min(count, start + size)))
        start += size
    return bounds


def _call_size(call: AsyncCall) -> int:
    """Requests an async call can queue (one per item or child; what is not a list fails when planned)."""
    given = call.items if call.handle is None else call.children
    return len(given) if isinstance(given, Sequence) and not isinstance(given, str) else 0


def _call_parts(calls: list[AsyncCall], units: int) -> list[list[AsyncCall]]:
    """Whole calls in the growing parts of `_parts(units)`: a part closes once the calls so far reach its end."""
    ends = iter(end for _, end in _parts(units))
    parts, part, held, end = [], [], 0, next(ends)
    for call in calls:
        part.append(call)
        held += _call_size(call)
        if held >= end:
            parts.append(part)
            part = []
            while held >= end:
                end = next(ends, units + 1)
    return parts + ([part] if part else [])


def _submitted_together(
    planned: list[list[ScoringJob] | Exception], submit: Callable[[list[Request]], list[Future]]
) -> list[tuple[list[ScoringJob], list[Future]] | Exception]:
    """Queue every planned call's requests in one submission; each call's jobs with its own futures."""
    futures = iter(submit([request for jobs in planned if not isinstance(jobs, Exception) for job in jobs for request in job.requests]))
    return [jobs if isinstance(jobs, Exception) else (jobs, [next(futures) for job in jobs for _ in job.requests]) for jobs in planned]


def _is_step_lists(children: Any) -> bool:
    """Whether `children` is shaped as extend's children (a non-empty list; each child is checked when planned)."""
    return isinstance(children, Sequence) and not isinstance(children, (str, Mapping)) and len(children) > 0


def _check_item_list(items: Any) -> None:
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise InvalidInputError("score() takes a list of items")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The asked device, checked; else CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {str(device)!r} was asked for, but this torch build or machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise InvalidInputError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda'")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, config: BackboneConfig, device: torch.device) -> torch.dtype:
    """The asked dtype; else the checkpoint's on GPU and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def _tensor_names_if_needed(path: Path, config: BackboneConfig) -> set[str] | None:
    """Tensor names, read only when the architecture alone cannot name the format."""
    if any(a.endswith("ForCausalLM") for a in config.architectures):
        from contextlib import ExitStack

        with ExitStack() as stack:
            return CheckpointTensors(path, stack).names()
    return None


def _request(token_ids: list[int], read_positions: list[int], priority: int, **options: Any) -> Request:
    """An engine request for the ids up to the last read position (and what a kept node pins): the model is causal,
    so no reward depends on later tokens (Qwen2.5-Math-PRM's `<|im_end|>` and newline), and they are never computed."""
    end = max(max(read_positions) + 1, options.get("keep_tokens", 0))
    ids = token_ids if end >= len(token_ids) else token_ids[:end]
    return Request(new_request_id(), ids, read_positions, priority, input_tokens=len(token_ids), **options)
