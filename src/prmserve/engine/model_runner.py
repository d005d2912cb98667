"""Turns a schedule into packed tensors, runs the model, and keeps every token's head output."""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

import numpy as np
import torch

from prmserve.engine.block_manager import BlockManager
from prmserve.engine.cuda_graphs import SCRATCH_SLOTS, CudaGraphs, StepArrays
from prmserve.engine.scheduler import ScheduledChunk
from prmserve.models.attention import AttentionInputs, cumulative_lengths
from prmserve.models.transformer import RewardModel

if TYPE_CHECKING:
    from prmserve.parallel.workers import TensorParallelWorkers

logger = logging.getLogger("prmserve")


class ModelRunner:
    """Owns the KV pool and the head-output pool of one model on one device.

    With tensor parallelism this is rank 0's runner: `workers` get every forward's inputs and run it beside it.
    """

    def __init__(self, model: RewardModel, blocks: BlockManager, workers: TensorParallelWorkers | None = None) -> None:
        self.model = model
        self.blocks = blocks
        self.workers = workers
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.scratch = blocks.num_blocks * blocks.block_size  # slots from here on: CUDA graphs' padding
        slots = self.scratch + SCRATCH_SLOTS
        self.kv_cache = torch.empty(
            (cfg.num_layers, 2, slots, model.num_kv_heads, cfg.head_dim), dtype=self.dtype, device=self.device
        )
        if workers is not None:
            workers.allocate_cache(slots)  # the same slots, each rank for its own KV heads
        # Head outputs of every cached token, so a cached step's reward is read, not recomputed.
        self.head_cache = torch.zeros((slots, model.head_spec.width), dtype=torch.float32, device=self.device)
        self.graphs: CudaGraphs | None = None

    def capture_graphs(self, max_seqs: int) -> bool:
        """Capture CUDA graphs of the forward for small steps (call after `warmup`, before serving).

        The graphs hold the compiled layers, as the other steps run them; if that capture fails, eager layers are
        captured instead (small steps then round differently from large ones). Returns whether compiled ones were.
        """
        assert self.workers is None, "CUDA graphs are captured for one rank only"
        graphs = CudaGraphs(self.model, self.kv_cache, self.head_cache, self.scratch, max_seqs)
        try:
            graphs.capture_all()
        except RuntimeError as exc:
            logger.warning("CUDA graphs of the compiled layers failed (%s); capturing eager ones: small steps now round "
                           "differently from large ones", exc)
            graphs = CudaGraphs(self.model, self.kv_cache, self.head_cache, self.scratch, max_seqs, compiled_layers=False)
            graphs.capture_all()
        self.graphs = graphs
        return graphs.compiled_layers

    @staticmethod
    def bytes_per_block(model: RewardModel, block_size: int, dtype: torch.dtype) -> int:
        """Memory one block takes in the KV pool and the head-output pool."""
        cfg = model.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv = cfg.num_layers * 2 * model.num_kv_heads * cfg.head_dim * itemsize
        return block_size * (kv + 4 * model.head_spec.width)

    def step_arrays(self, chunks: list[ScheduledChunk]) -> StepArrays:
        """The step's host-side index arrays, built with numpy (no torch CPU kernels: their thread pool fights
        the launching thread, and per-token Python loops cost milliseconds at tree-search sizes).

        A head reading each token's predecessor (token log-probs) runs a chunk after cached tokens from one token
        earlier; that token's KV is in the pool already, so its recomputed copy goes to a scratch slot.
        Keys (every sequence's slots from position 0) are gathered only when some chunk follows a cached prefix
        or graphs may replay the step (graphs always gather).
        """
        back = 1 if self.model.head_spec.needs_previous_token else 0
        size = self.blocks.block_size
        gather = self.graphs is not None or any(c.start > 0 for c in chunks)
        tokens, positions, slots, keys, lens_q, lens_k = [], [], [], [], [], []
        for c in chunks:
            start = max(c.start - back, 0)
            table = np.asarray(c.request.block_table, dtype=np.int64)
            span = np.arange(0 if gather else c.start, c.end, dtype=np.int64)
            span_slots = table[span // size] * size + span % size
            own = span_slots[c.start:] if gather else span_slots  # this chunk's new tokens
            if c.request.share_in is not None:  # its first tokens after the cache: a block this step computes
                source, _, count = c.request.share_in
                first = c.start - count
                span_slots[first : c.start] = source * size + np.arange(count)
            tokens.append(np.asarray(c.request.token_ids[start : c.end], dtype=np.int64))
            positions.append(np.arange(start, c.end, dtype=np.int64))
            slots.append(np.concatenate([np.full(c.start - start, self.scratch, np.int64), own]) if start < c.start else own)
            if gather:
                keys.append(span_slots)
            lens_q.append(c.end - start)
            lens_k.append(c.end)
        empty = np.zeros(0, np.int64)
        return StepArrays(np.concatenate(tokens), np.concatenate(positions), np.concatenate(slots),
                          np.concatenate(keys) if keys else empty, lens_q, lens_k)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> None:
        """Compute the chunks' tokens; their KV and head outputs land in the pools.

        Index arrays cross to the device in one copy (or fill a CUDA graph's inputs); nothing waits for the GPU.
        """
        self._copy_slots(_taken(chunks, "copy_in"))
        step = self.step_arrays(chunks)
        shares = _taken(chunks, "share_in")
        if self.graphs is None or not self.graphs.run(step):
            self._run_eager(step)
        self._copy_slots(shares)  # their sources were written by this forward

    def _run_eager(self, step: StepArrays) -> None:
        parts = [step.tokens, step.positions, step.slots, step.keys, _cumulative(step.lens_q), _cumulative(step.lens_k)]
        packed = to_device(torch.from_numpy(np.concatenate(parts)), self.device)
        ids, positions_t, slot_mapping, key_slots, cu_q, cu_k = packed.split([len(p) for p in parts])
        inputs = AttentionInputs(
            cu_seqlens_q=cu_q.to(torch.int32),
            cu_seqlens_k=cu_k.to(torch.int32),
            max_seqlen_q=max(step.lens_q),
            max_seqlen_k=max(step.lens_k),
            kv_cache=self.kv_cache,
            slot_mapping=slot_mapping,
            key_slots=key_slots if len(step.keys) else None,
            seq_lens_q=step.lens_q,
            seq_lens_k=step.lens_k,
        )
        out = self._forward(ids, positions_t, inputs)
        self.head_cache[inputs.slot_mapping] = out.float()

    def _copy_slots(self, copies: list[tuple[int, int, int]]) -> None:
        """KV and head outputs of tokens a request shares with part of another block, copied into its own block
        (one gather and one scatter for the step): (source block, own block, count) each."""
        if not copies:
            return
        size = self.blocks.block_size
        source = np.concatenate([np.arange(s * size, s * size + n, dtype=np.int64) for s, _, n in copies])
        target = np.concatenate([np.arange(t * size, t * size + n, dtype=np.int64) for _, t, n in copies])
        index = to_device(torch.from_numpy(np.concatenate([source, target])), self.device)
        source_t, target_t = index.split(len(source))
        self.kv_cache[:, :, target_t] = self.kv_cache[:, :, source_t]
        self.head_cache[target_t] = self.head_cache[source_t]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """The model's forward; with tensor parallelism the workers run the same step beside it."""
        if self.workers is None:
            return self.model(ids, positions, inputs)
        return self.workers.run_step(self.model, ids, positions, inputs)

    @torch.inference_mode()
    def warmup(self, max_tokens: int) -> None:
        """Run the forward at the batch shapes that compile, pick kernels or grow memory differently (1 token,
        a small step, the full token budget as one sequence and as many, after cached prefixes too), so the first
        real call is no slower than later ones. Writes only KV slots of blocks that hold nothing yet (call before
        serving)."""
        largest = min(max_tokens, self.kv_cache.shape[2])
        many = max(1, min(64, largest // 16))
        steps = [[(1, 0)], [(16, 0)], [(largest, 0)], [(min(16, largest), largest - min(16, largest))],
                 [(largest // many, 0)] * many, [(largest // (2 * many), largest // (2 * many))] * many]
        gen = torch.Generator().manual_seed(0)
        for sequences in steps:
            sequences = [(count, prefix) for count, prefix in sequences if count >= 1 and prefix >= 0]
            if sequences:
                self._warmup_step(sequences, gen)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warmup_step(self, sequences: list[tuple[int, int]], gen: torch.Generator) -> None:
        """One forward of random tokens: (new tokens, cached prefix) per sequence, each on its own run of slots."""
        lens_q = [count for count, _ in sequences]
        lens_k = [count + prefix for count, prefix in sequences]
        bases = np.cumsum([0] + lens_k[:-1])
        positions = np.concatenate([np.arange(prefix, prefix + count) for count, prefix in sequences])
        slots = np.concatenate([base + np.arange(prefix, prefix + count) for base, (count, prefix) in zip(bases, sequences)])
        keys = np.arange(sum(lens_k)) if any(prefix for _, prefix in sequences) else None
        to = {"device": self.device}
        ids = torch.randint(0, self.model.config.vocab_size, (sum(lens_q),), generator=gen)
        inputs = AttentionInputs(
            cu_seqlens_q=cumulative_lengths(lens_q).to(**to),
            cu_seqlens_k=cumulative_lengths(lens_k).to(**to),
            max_seqlen_q=max(lens_q),
            max_seqlen_k=max(lens_k),
            kv_cache=self.kv_cache,
            slot_mapping=torch.from_numpy(slots).to(**to),
            key_slots=None if keys is None else torch.from_numpy(keys).to(**to),
            seq_lens_q=lens_q,
            seq_lens_k=lens_k,
        )
        out = self._forward(ids.to(**to), torch.from_numpy(positions).to(**to), inputs)
        self.head_cache[inputs.slot_mapping] = out.float()

    def read_outputs(self, requests: list) -> list[torch.Tensor]:
        """Head outputs [reads, width] at each request's read positions, in the model's dtype (one gather).

        They stay on the model's device, so the engine thread never waits for the GPU; whoever reads
        them turns them into rewards there and copies the rewards back once (`PRM.collect`).
        """
        slots = [self.blocks.slot(r, p) for r in requests for p in r.read_positions]
        index = to_device(_index_tensor(slots), self.device)
        values = self.head_cache[index].to(self.dtype)
        return list(values.split([len(r.read_positions) for r in requests]))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied behind the stream's earlier work from pinned memory: a copy from pageable
    memory can hold the host until the GPU has finished the step it still runs, so the next step could not be
    prepared meanwhile. (The caching host allocator keeps the pinned copy until the transfer is done.)"""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _taken(chunks: list[ScheduledChunk], name: str) -> list[tuple[int, int, int]]:
    """The chunks' block copies of one kind (`copy_in` or `share_in`), cleared on their requests: each is done once."""
    copies = []
    for c in chunks:
        copy = getattr(c.request, name)
        if copy is not None:
            copies.append(copy)
            setattr(c.request, name, None)
    return copies


def _cumulative(lengths: list[int]) -> np.ndarray:
    """0, l0, l0+l1, ...: where packed sequences start."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _index_tensor(values: list[int]) -> torch.Tensor:
    """An int64 tensor of a long Python list, through numpy (several times faster than torch.tensor)."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


