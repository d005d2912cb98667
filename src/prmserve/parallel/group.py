"""The ranks of one tensor-parallel model, joined in torch.distributed's default process group."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

LOCALHOST = "127.0.0.1"
# The longest the ranks wait for each other, to join or inside one collective (a layer's all-reduce). An idle
# worker waits on its pipe, not in a collective, so idleness never runs into it.
GROUP_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place among the ranks that split one model (rank 0 keeps the head outputs)."""

    rank: int
    world_size: int

    @property
    def is_driver(self) -> bool:
        """Rank 0: it schedules, computes the reward head and keeps the head-output pool."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (row-parallel layers: each rank holds one part of the sum)."""
        dist.all_reduce(x)
        return x


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(store: dist.Store, rank: int, world_size: int, device: torch.device) -> TensorParallelGroup:
    """Join the default process group through `store` (rank 0's TCPStore); returns once every rank has joined."""
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    return TensorParallelGroup(rank, world_size)


def leave_group() -> None:
    """Destroy this process's default group, if it has one (closing a PRM lets a later one start its own)."""
    if dist.is_initialized():
        dist.destroy_process_group()
