"""Column- and row-parallel linears (vLLM's names): a backbone split across ranks uses them in place of nn.Linear.

A column-parallel linear holds `out_features / world_size` output rows and needs no communication: its split
output feeds a row-parallel linear holding the matching `in_features / world_size` input columns, whose partial
products the ranks sum (one all-reduce). Attention's QKV and the MLP's gate/up are column-parallel, the output
and down projections row-parallel, so each layer costs two all-reduces. The loader reads each rank's part of
a checkpoint tensor along `shard_dims` (`prmserve.parallel.sharding`).
"""

from __future__ import annotations

import torch
from torch import nn

from prmserve.parallel.group import TensorParallelGroup


class ColumnParallelLinear(nn.Linear):
    """`out_features` split across the ranks (its bias too); the forward is nn.Linear's."""

    shard_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__(in_features, out_features // tp.world_size, bias=bias)


class RowParallelLinear(nn.Linear):
    """`in_features` split across the ranks; the ranks' partial outputs are summed, so every rank gets the full one."""

    shard_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup) -> None:
        super().__init__(in_features // tp.world_size, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


def column_parallel(in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup | None) -> nn.Linear:
    """A plain nn.Linear on one rank (today's model, unchanged), else this rank's column-parallel part."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return ColumnParallelLinear(in_features, out_features, bias, tp)


def row_parallel(in_features: int, out_features: int, tp: TensorParallelGroup | None) -> nn.Linear:
    """A plain bias-free nn.Linear on one rank, else this rank's row-parallel part (summed over the ranks)."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=False)
    return RowParallelLinear(in_features, out_features, tp)
