"""Which part of each checkpoint tensor a rank reads, and which tensor-parallel sizes a model allows.

Attention splits by KV head (each rank its KV heads and their query heads), the MLP by intermediate size;
embeddings, norms and the reward head are not split. A rank reads only its part of a split tensor
(safetensors' `get_slice`), so no rank ever holds a whole layer in host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from prmserve.errors import CheckpointError, InvalidInputError
from prmserve.models.config import BackboneConfig


class SliceableTensors(Protocol):
    """What the loader's tensor sources offer: a tensor's shape, and a range of it along one dimension."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shard:
    """Part `rank` of `world_size` equal parts of a tensor along `dim`."""

    dim: int
    rank: int
    world_size: int

    def read(self, tensors: SliceableTensors, name: str) -> torch.Tensor:
        """This part of checkpoint tensor `name`, read without the rest."""
        length = tensors.shape(name)[self.dim]
        if length % self.world_size:
            raise CheckpointError(f"tensor {name} has {length} entries along dim {self.dim}: not divisible by {self.world_size} ranks")
        size = length // self.world_size
        return tensors.get_part(name, self.dim, self.rank * size, (self.rank + 1) * size)


def shard_of(model: nn.Module, param_name: str, rank: int, world_size: int) -> Shard | None:
    """How parameter `param_name` of `model` is split (its module's `shard_dims`), or None: every rank holds it whole."""
    module_name, _, leaf = param_name.rpartition(".")
    dims = getattr(model.get_submodule(module_name), "shard_dims", {})
    return Shard(dims[leaf], rank, world_size) if leaf in dims else None


def check_tensor_parallel_size(size: object, cfg: BackboneConfig) -> int:
    """`size` if the model splits into that many ranks; else InvalidInputError naming the sizes that work."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"tensor_parallel_size must be a positive integer, not {size!r}")
    splits = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    if any(value % size for value in splits.values()):
        common = math.gcd(*splits.values())
        working = [d for d in range(1, common + 1) if common % d == 0]
        given = ", ".join(f"{key} {value}" for key, value in splits.items())
        raise InvalidInputError(
            f"tensor_parallel_size {size} does not divide this model ({given}): ranks split attention by KV head "
            f"and the MLP by intermediate size; sizes that work: {', '.join(map(str, working))}"
        )
    return size
