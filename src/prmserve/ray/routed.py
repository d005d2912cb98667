"""`RoutedPRM`: `PRM`'s API (and so the HTTP app) over N engine replicas on Ray. This process tokenises, keeps node
handles and turns head outputs into rewards; the replicas (`PRMActor`s) hold the weights and run the engines."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from prmserve.completions import chat_to_completion
from prmserve.engine import EngineConfig, EngineStats
from prmserve.errors import InvalidInputError, RequestCancelledError
from prmserve.formats import detect_format, make_format
from prmserve.models import BackboneConfig, resolve_checkpoint
from prmserve.models.transformer import RewardModel
from prmserve.prm import _ENGINE_OPTIONS, _PRM_OPTIONS, BUNDLED_MODEL, PRM, ScoringJob, _tensor_names_if_needed
from prmserve.ray.actor import PRMActor, ReplicaInfo
from prmserve.ray.pool import DEFAULT_MAX_IMBALANCE, ReplicaPool
from prmserve.ray.routing import problem_key, routed_like, with_key
from prmserve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class PoolShape:
    """The replicas' KV pools taken together (what the startup log and `plan_extend` read of `engine.blocks`)."""

    num_blocks: int
    block_size: int


class ReplicaEngineView:
    """What `PRM` and the server read of `prm.engine`, for engines that run in the replicas."""

    def __init__(self, config: EngineConfig, pool: ReplicaPool, infos: Sequence[ReplicaInfo]) -> None:
        self.config, self.pool = config, pool
        self.blocks = PoolShape(sum(i.num_blocks for i in infos), infos[0].block_size)
        self.max_tokens_per_request = min(i.max_tokens_per_request for i in infos)
        self.step_observers: list = []  # steps happen in the replicas; their totals come through stats()

    def stats(self) -> EngineStats:
        return self.pool.stats()


class RoutedPRM(PRM):
    """`PRM(model, **options)` as `data_parallel_size` replicas on the Ray cluster (`ray.init()` first), routed by
    prefix affinity: the items of one problem, and every call on one node handle, go to the same replica; the rest
    to the least loaded. Priorities apply in each replica's engine. `actor_options` go to `PRMActor.options` (default:
    one GPU each when the cluster has GPUs and no other device was asked for)."""

    def __init__(
        self,
        model: str | None = None,
        data_parallel_size: int = 2,
        *,
        actor_options: Mapping[str, Any] | None = None,
        max_imbalance: int = DEFAULT_MAX_IMBALANCE,
        **options: Any,
    ) -> None:
        if not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise InvalidInputError(f"data_parallel_size must be an integer >= 1, not {data_parallel_size!r}")
        if not ray.is_initialized():
            ray.init()
        self.model_name = str(model) if model is not None else "prmserve/small-prm"
        self.path = resolve_checkpoint(model if model is not None else BUNDLED_MODEL, options.get("revision"), options.get("download_dir"))
        self.config = BackboneConfig.from_file(self.path)
        tokenizer = options.get("tokenizer")
        self.tokenizer = load_tokenizer(self.path if tokenizer is None else resolve_checkpoint(tokenizer, None, options.get("download_dir")))
        spawn = PRMActor.options(**(dict(actor_options) if actor_options is not None else _default_actor_options(options)))
        actors = [spawn.remote(model, **options) for _ in range(data_parallel_size)]  # they load at the same time
        format_options = {k: v for k, v in options.items() if k not in _ENGINE_OPTIONS and k not in _PRM_OPTIONS and k not in _LOADING}
        self.format_name = options.get("format") or detect_format(self.config, _tensor_names_if_needed(self.path, self.config), self.model_name)
        self.format = make_format(self.format_name, self.tokenizer, self.config, **format_options)
        infos = ray.get([a.info.remote() for a in actors])
        self.device, self.dtype = torch.device(infos[0].device), getattr(torch, infos[0].dtype)
        with torch.device("meta"):  # shapes only (KV bytes per block in the startup log); the weights are in the replicas
            self.model = RewardModel(self.config, self.format.head)
        self.compiled = False  # this process runs no layers
        config = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
        pool = ReplicaPool(actors, config.max_queue, max_imbalance)
        self.engine = ReplicaEngineView(config, pool, infos)
        self._loop = pool
        self._loop_lock = threading.Lock()
        self._set_up_calls({k: options.get(k, default) for k, default in _PRM_OPTIONS.items()})

    @property
    def loop(self) -> ReplicaPool:  # type: ignore[override]
        """The replicas; gone after `close`."""
        if self._loop is None:
            raise RequestCancelledError("this RoutedPRM is closed")
        return self._loop

    @property
    def pool(self) -> ReplicaPool:
        return self.loop

    def close(self) -> None:
        """Let the nodes go, finish what was submitted, and stop the replicas."""
        self.nodes.clear()
        if self._loop is not None:
            self._loop.shutdown(timeout=30.0)
            self._loop = None

    def plan_score(self, items: Sequence[Mapping[str, Any]], priority: int = 0, keep: bool = False) -> list[ScoringJob]:
        """`PRM.plan_score`, each request tagged with its problem's key (a problem's items meet on one replica)."""
        jobs = super().plan_score(items, priority, keep)
        for item, job in zip(items, jobs):
            problem = _problem_of(item)
            if problem is not None:
                for request in job.requests:
                    request.request_id = with_key(request.request_id, problem_key(problem))
        return jobs

    def plan_extend(
        self, handle: str, children: Sequence[Sequence[str]], priority: int = 0, keep: bool = False,
        known: Mapping[str, list[int]] | None = None,
    ) -> list[ScoringJob]:
        """`PRM.plan_extend`, the children routed as their node's handle is (to the replica that holds its prefix)."""
        jobs = super().plan_extend(handle, children, priority, keep, known)
        for job in jobs:
            job.request.request_id = routed_like(job.request.request_id, handle)
        return jobs


# PRM's own keyword arguments (format, device, dtype, ...); the rest of its options are the engine's, the node table's
# and the format's.
_LOADING = {name for name, p in inspect.signature(PRM.__init__).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self", "model"}


def _problem_of(item: Mapping[str, Any]) -> str | None:
    """The problem text that groups an item with its siblings (a chat's user turn); None for pre-formatted input."""
    if "messages" in item:
        return chat_to_completion(item["messages"])[0]
    problem = item.get("problem")
    return problem if isinstance(problem, str) else None


def _default_actor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """One GPU per replica when the cluster has GPUs and the replicas may use CUDA; else Ray's defaults."""
    device = options.get("device")
    wants_gpu = device is None or str(device).startswith("cuda")
    return {"num_gpus": 1} if wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else {}
