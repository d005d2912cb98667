"""What rank 0 sends the workers for each forward: a small header by pipe, then one int64 tensor by broadcast.

The header (sizes and the host-side sequence lengths) tells a worker how large a buffer the broadcast fills;
the tensor holds the token ids, positions, KV slots to write, key slots to gather and the sequence starts,
already on the device for NCCL, so rank 0 never waits for the GPU to send a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prmserve.models.attention import AttentionInputs


@dataclass(frozen=True)
class StepHeader:
    """The sizes of one step's packed tensor and what attention needs on the host."""

    num_tokens: int
    num_keys: int  # key slots to gather; 0 when no sequence follows a cached prefix
    num_seqs: int
    max_seqlen_q: int
    max_seqlen_k: int
    seq_lens_q: list[int] | None
    seq_lens_k: list[int] | None

    @property
    def sizes(self) -> list[int]:
        """Lengths of the packed parts: ids, positions, slots, key slots, cu_seqlens_q, cu_seqlens_k."""
        return [self.num_tokens] * 3 + [self.num_keys] + [self.num_seqs + 1] * 2


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> tuple[StepHeader, torch.Tensor]:
    """A forward's inputs as (header, one int64 tensor on their device)."""
    assert inputs.kv_cache is not None and inputs.slot_mapping is not None, "workers compute into their KV pools"
    keys = inputs.key_slots
    header = StepHeader(
        len(input_ids), 0 if keys is None else len(keys), len(inputs.cu_seqlens_q) - 1,
        inputs.max_seqlen_q, inputs.max_seqlen_k, inputs.seq_lens_q, inputs.seq_lens_k,
    )
    parts = [input_ids, positions, inputs.slot_mapping, *([] if keys is None else [keys]), inputs.cu_seqlens_q, inputs.cu_seqlens_k]
    return header, torch.cat([p.to(torch.int64) for p in parts])


def broadcast_step(packed: torch.Tensor) -> None:
    """Rank 0's half of the step's broadcast."""
    dist.broadcast(packed, src=0)


def receive_step(header: StepHeader, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
    """A worker's half: the step's (input_ids, positions, attention inputs over this rank's `kv_cache`)."""
    packed = torch.empty(sum(header.sizes), dtype=torch.int64, device=kv_cache.device)
    dist.broadcast(packed, src=0)
    ids, positions, slots, keys, cu_q, cu_k = packed.split(header.sizes)
    inputs = AttentionInputs(
        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=header.max_seqlen_q, max_seqlen_k=header.max_seqlen_k,
        kv_cache=kv_cache, slot_mapping=slots, key_slots=keys if header.num_keys else None,
        seq_lens_q=header.seq_lens_q, seq_lens_k=header.seq_lens_k,
    )
    return ids, positions, inputs
