"""CUDA graphs for small steps: a tree search's children are a few hundred new tokens on cached nodes,
where launching ~1,000 kernels one by one costs more than the GPU work they do.

Each graph is the whole forward (every layer, the KV writes and the head-output write) captured at a
fixed shape: `tokens` new tokens and `keys` gathered keys, up to `seqs` sequences. A step is padded
up to the nearest shape: extra tokens form one padding sequence whose KV and head outputs go to
scratch slots past the pool, unused sequence entries have length 0, and unused keys are never read.
Sequence counts come in buckets too (16, 64, max_num_seqs): Flash launches a block per (query tile, sequence entry, head) and
an empty entry's blocks still cost launch slots: 258 entries for 16 children took 160 us a layer (H200),
a quarter of the step's GEMM time.
The padded inputs are filled into the graph's static buffer with one host-to-device copy from pinned memory (queued
behind the step still running, never waiting for it), then the graph is replayed. The graphs hold the same compiled layers as every other step: eager and fused
elementwise code round differently, and an item's rewards must not depend on which path its step took
(eager layers are captured only where capturing compiled ones fails).

Token buckets are fine-grained (at most 25% padding above 64 tokens, 17% above 512): a padded token costs
as much GPU time as a real one, and tree-search steps come in every size between 16 and 2,048 tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from prmserve.models.attention import AttentionInputs
from prmserve.models.transformer import RewardModel, finish_layer, project_qkv

TOKEN_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896,
                 960, 1024, 1152, 1280, 1408, 1536, 1792, 2048)
KEY_BUCKETS = (1024, 4096, 16384, 65536)  # padded keys are filler reads of one scratch slot: cheap, so coarse
SEQ_BUCKETS = (16, 64)  # then max_seqs: a graph's sequence entries (its real sequences, at most)
SCRATCH_SLOTS = TOKEN_BUCKETS[-1]  # slots past the pool for padding tokens' KV and head outputs


@dataclass(frozen=True)
class StepArrays:
    """A step's host-side inputs: ids, positions and pool slots of new tokens, slots of every key, lengths."""

    tokens: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    keys: np.ndarray
    lens_q: list[int]
    lens_k: list[int]


def seq_buckets(max_seqs: int) -> list[int]:
    """The sequence counts graphs are captured for, up to the engine's `max_num_seqs`."""
    return sorted({b for b in SEQ_BUCKETS if b < max_seqs} | {max_seqs})


def valid_shapes(max_seqs: int) -> list[tuple[int, int, int]]:
    """(tokens, keys, seqs) of every graph: keys include the new tokens (keys >= tokens), and a sequence has at
    least one token, so a sequence bucket above the one that first holds `tokens` sequences never occurs."""
    shapes = []
    for keys in KEY_BUCKETS:
        for tokens in TOKEN_BUCKETS:
            if keys < tokens:
                continue
            below = 0
            for seqs in seq_buckets(max_seqs):
                if below < tokens:
                    shapes.append((tokens, keys, seqs))
                below = seqs
    return shapes


def shape_for(step: StepArrays, max_seqs: int) -> tuple[int, int, int] | None:
    """The smallest (tokens, keys, seqs) graph shape this step fits, or None (too big: run it eagerly)."""
    seqs = next((b for b in seq_buckets(max_seqs) if b >= len(step.lens_q)), None)
    tokens = next((b for b in TOKEN_BUCKETS if b >= len(step.tokens)), None)
    if seqs is None or tokens is None:
        return None
    keys = next((b for b in KEY_BUCKETS if b >= len(step.keys) + tokens - len(step.tokens)), None)
    return None if keys is None else (tokens, keys, seqs)


def pad(step: StepArrays, tokens: int, keys: int, seqs: int, scratch: int) -> np.ndarray:
    """The graph's packed int64 input [ids, positions, slots, keys, cu_q, cu_k] for this step, padded."""
    extra = tokens - len(step.tokens)
    scratch_slots = scratch + np.arange(extra, dtype=np.int64)
    ids = np.concatenate([step.tokens, np.zeros(extra, np.int64)])
    positions = np.concatenate([step.positions, np.arange(extra, dtype=np.int64)])
    slots = np.concatenate([step.slots, scratch_slots])
    filler = np.full(keys - len(step.keys) - extra, scratch, np.int64)
    key_slots = np.concatenate([step.keys, scratch_slots, filler])
    cu_q = _padded_cumulative(step.lens_q, extra, seqs)
    cu_k = _padded_cumulative(step.lens_k, extra, seqs)
    return np.concatenate([ids, positions, slots, key_slots, cu_q, cu_k])


def _padded_cumulative(lengths: list[int], extra: int, seqs: int) -> np.ndarray:
    """Starts of the real sequences, then the padding sequence, then empty ones: seqs + 2 entries."""
    out = np.zeros(seqs + 2, dtype=np.int64)
    np.cumsum(lengths + [extra], out=out[1 : len(lengths) + 2])
    out[len(lengths) + 2 :] = out[len(lengths) + 1]
    return out


def layout(tokens: int, keys: int, seqs: int) -> list[int]:
    return [tokens, tokens, tokens, keys, seqs + 2, seqs + 2]


def padded_forward(model: RewardModel, kv_cache: torch.Tensor, head_cache: torch.Tensor, packed: torch.Tensor,
                   tokens: int, keys: int, seqs: int) -> None:
    """The forward a graph holds: padded inputs in, KV and head outputs written to the pools."""
    ids, positions, slots, key_slots, cu_q, cu_k = packed.split(layout(tokens, keys, seqs))
    inputs = AttentionInputs(
        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=tokens, max_seqlen_k=keys,
        kv_cache=kv_cache, slot_mapping=slots, key_slots=key_slots,
    )
    head_cache[slots] = model(ids, positions, inputs).float()


class CudaGraphs:
    """Captured forwards for every small (tokens, keys, seqs) shape, replayed for the steps that fit one."""

    def __init__(self, model: RewardModel, kv_cache: torch.Tensor, head_cache: torch.Tensor, scratch: int, max_seqs: int,
                 compiled_layers: bool = True) -> None:
        self.model, self.kv_cache, self.head_cache = model, kv_cache, head_cache
        self.scratch, self.max_seqs = scratch, max_seqs
        self.compiled_layers = compiled_layers  # capture the model's current (compiled) layer functions, else eager ones
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @property
    def max_tokens(self) -> int:
        """The most new tokens a replayed step can hold."""
        return TOKEN_BUCKETS[-1]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every shape a step can take (`valid_shapes`), smallest keys first."""
        pool = torch.cuda.graph_pool_handle()
        for shape in valid_shapes(self.max_seqs):
            self.graphs[shape] = self._capture(*shape, pool)
        torch.cuda.synchronize()

    def _capture(self, tokens: int, keys: int, seqs: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        empty = StepArrays(*(np.zeros(0, np.int64) for _ in range(4)), [], [])
        host = pad(empty, tokens, keys, seqs, self.scratch)  # all padding: a valid step
        packed = torch.from_numpy(host).to(self.kv_cache.device)
        step = lambda: padded_forward(self.model, self.kv_cache, self.head_cache, packed, tokens, keys, seqs)  # noqa: E731
        with contextlib.nullcontext() if self.compiled_layers else _eager_layers(self.model):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up outside the graph (lazy initialisation, cuBLAS handles)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
        return graph, packed

    def run(self, step: StepArrays) -> bool:
        """Replay the graph this step fits, after filling its inputs; False when none fits."""
        shape = shape_for(step, self.max_seqs)
        if shape is None or shape not in self.graphs:
            return False
        graph, packed = self.graphs[shape]
        packed.copy_(torch.from_numpy(pad(step, *shape, self.scratch)).pin_memory(), non_blocking=True)  # see to_device
        graph.replay()
        self.replays += 1
        return True


class _eager_layers:
    """Use the uncompiled layer functions for a while (graphs capture eager kernels)."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.saved: tuple[Callable, Callable] | None = None

    def __enter__(self) -> None:
        self.saved = (self.model._project, self.model._finish)
        self.model._project, self.model._finish = project_qkv, finish_layer

    def __exit__(self, *exc: object) -> None:
        self.model._project, self.model._finish = self.saved
