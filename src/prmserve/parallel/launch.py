"""Start a tensor-parallel model: workers for ranks 1..N-1 in their own processes, this process as rank 0."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from prmserve.errors import InvalidInputError, TensorParallelError
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.loader import load_reward_model
from prmserve.models.transformer import RewardModel
from prmserve.parallel.group import GROUP_TIMEOUT, LOCALHOST, join_group
from prmserve.parallel.worker import WorkerSpec
from prmserve.parallel.workers import TensorParallelWorkers


def start_tensor_parallel(
    checkpoint: Path, cfg: BackboneConfig, head: HeadSpec, device: torch.device, dtype: torch.dtype, size: int, compile: bool,
    attention_backend: str,
) -> tuple[TensorParallelWorkers, RewardModel]:
    """Spawn the workers, join them as rank 0 (a TCPStore on a free loopback port) and load every rank's part of
    the model at once, each from the checkpoint files; returns once all are loaded."""
    if head.reference_model is not None:
        raise InvalidInputError("tensor_parallel_size > 1 cannot split an implicit PRM (a model and its reference in one engine) yet")
    if dist.is_initialized():
        raise TensorParallelError(
            "this process already has a torch.distributed process group, and tensor_parallel_size > 1 starts its "
            "own: close the other tensor-parallel PRM first, or load this one in a process of its own"
        )
    first = _first_device(device, size)
    store = dist.TCPStore(LOCALHOST, 0, size, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False)
    spec = WorkerSpec(checkpoint, cfg, head, device.type, first, dtype, size, store.port, compile, torch.get_num_threads(),
                      attention_backend)
    workers = TensorParallelWorkers.spawn(spec, store)
    try:
        workers.wait_for("connected")
        tp = join_group(store, 0, size, spec.device(0))
        model = load_reward_model(checkpoint, cfg, head, spec.device(0), dtype, tp)
        workers.free_memory = workers.wait_for("ready")
    except BaseException:
        workers.close()
        raise
    workers.watch()
    return workers, model


def _first_device(device: torch.device, size: int) -> int:
    """The GPU index of rank 0 (rank r takes the r-th after it); 0 on the CPU, where ranks are processes."""
    if device.type != "cuda":
        return 0
    first = torch.cuda.current_device() if device.index is None else device.index
    if first + size > torch.cuda.device_count():
        raise InvalidInputError(
            f"tensor_parallel_size {size} needs GPUs cuda:{first}..cuda:{first + size - 1}; this machine has {torch.cuda.device_count()}"
        )
    return first
