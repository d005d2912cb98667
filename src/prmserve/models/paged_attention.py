"""A Triton attention kernel that reads keys where the KV pool keeps them and packs a KV head's query heads.

Why not Flash: Flash's varlen kernel wants each sequence's keys contiguous (every layer gathers them out of the
pool first) and gives each query head its own tile, so with grouped-query attention a KV head is read once per
query head and a tree search's ~40-query children leave most of a 128-row tile empty. Here one program takes
`BLOCK_M` (query token, query head) rows of one KV head's group, so a child of 44 tokens with 7 query heads per
KV head fills 5 full 64-row tiles per KV head, each reading the keys once, instead of 7 tiles a third full, and
keys are loaded by slot, in place.

Every row's result depends on its own query and keys only: keys are visited in blocks of `BLOCK_N` from position
0 of the sequence, the block shapes are fixed (no autotuning), and a block that is fully masked for a row leaves
that row's running max, sum and output unchanged to the bit. So an item's rewards do not depend on what it was
batched with, which tile it shared, or how its sequence was chunked (the engine's batch invariance).

Tiles are numbered across sequences (`cu_seqlens_q` is read on the device), so the grid depends only on the
token and sequence counts: a CUDA graph captured for a shape replays any step of that shape.
"""

from __future__ import annotations

import functools

import torch

# One block shape for every step: the key block fixes the order of a row's softmax sums, so it may not vary with the
# step. Chosen on an H200 (bench/attention_kernels.py --sweep): from 1 child to a 128-item beam level it was the
# fastest or within 10% of it, 1.4-2.7x faster than the Flash path; on 8k-token traces within 7% of Flash.
BLOCK_M = 64  # (query token, query head) rows per program
BLOCK_N = 64  # keys per inner step
NUM_WARPS, NUM_STAGES = 4, 3
SEQ_CHUNK = 64  # sequence entries scanned per loop step when a program looks for its tile's sequence


def supports_head_dim(dim: int) -> bool:
    """The kernel's head sizes: powers of two from 16 to 256 (a Triton block's length is a power of two)."""
    return 16 <= dim <= 256 and dim & (dim - 1) == 0


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of PyTorch, not CPU ones)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_index: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Bottom-right causal attention of packed queries q [T, H, D] over keys and values [S, Hkv, D].

    Sequence i's queries are q[cu_q[i]:cu_q[i+1]]; its keys are rows `key_index[cu_k[i]:cu_k[i+1]]` of `keys` and
    `values` (the pool's slots), or rows cu_k[i]:cu_k[i+1] themselves when `key_index` is None.
    """
    kernel = _kernel()
    tokens, heads, dim = q.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads or not supports_head_dim(dim) or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"paged attention needs a power-of-two head size (16..256), query heads a multiple of KV heads "
                         f"and dense head rows; got queries {tuple(q.shape)}, keys {tuple(keys.shape)}")
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    group = heads // kv_heads
    seqs = cu_seqlens_q.numel() - 1
    tiles = (tokens * group + BLOCK_M - 1) // BLOCK_M + seqs  # an upper bound of the tiles over all sequences
    index = key_index if key_index is not None else cu_seqlens_k  # any int tensor: not read without HAS_INDEX
    log2e = 1.4426950408889634
    kernel[(tiles, kv_heads)](
        q, keys, values, index, cu_seqlens_q, cu_seqlens_k, out,
        scale * log2e, sliding_window or 0, seqs,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SEQ_CHUNK=SEQ_CHUNK,
        HAS_INDEX=key_index is not None, HAS_WINDOW=sliding_window is not None,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


@functools.cache
def _kernel():
    """The kernel, defined on first use so that importing this module needs no Triton."""
    import triton
    import triton.language as tl

    # Triton compiles a variant per integer value class (1, multiples of 16) and pointer alignment of its arguments;
    # the sequence count, window and index views vary by step, so they are not specialised on (no compile mid-serving).
    @triton.jit(do_not_specialize=["window", "num_seqs"], do_not_specialize_on_alignment=["KIDX", "CUQ", "CUK"])
    def attention_kernel(
        Q, K, V, KIDX, CUQ, CUK, OUT,
        scale_log2, window, num_seqs,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SEQ_CHUNK: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        # Which sequence holds this tile: tiles are numbered sequence after sequence, ceil(rows / BLOCK_M) each.
        seq = 0
        first_tile = 0
        carry = 0
        for base in range(0, num_seqs, SEQ_CHUNK):
            entry = base + tl.arange(0, SEQ_CHUNK)
            live = entry < num_seqs
            start = tl.load(CUQ + entry, mask=live, other=0)
            stop = tl.load(CUQ + entry + 1, mask=live, other=0)
            count = ((stop - start) * GROUP + BLOCK_M - 1) // BLOCK_M
            ends = carry + tl.cumsum(count, 0)
            done = (ends <= tile) & live
            seq += tl.sum(done.to(tl.int32), 0)
            first_tile = tl.maximum(first_tile, tl.max(tl.where(done, ends, 0), 0))
            carry += tl.sum(count, 0)
        if seq < num_seqs:
            q_start = tl.load(CUQ + seq)
            len_q = tl.load(CUQ + seq + 1) - q_start
            k_start = tl.load(CUK + seq)
            len_k = tl.load(CUK + seq + 1) - k_start
            rows = (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = rows < len_q * GROUP
            token = rows // GROUP
            head = kv_head * GROUP + rows % GROUP
            position = len_k - len_q + token  # the query's position among its sequence's keys
            dims = tl.arange(0, HEAD_DIM)
            q_ptr = Q + (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
            q = tl.load(q_ptr, mask=valid[:, None], other=0.0)
            last_token = tl.minimum((tile - first_tile) * BLOCK_M + BLOCK_M - 1, len_q * GROUP - 1) // GROUP
            hi = tl.minimum(len_k, len_k - len_q + last_token + 1)
            lo = 0
            if HAS_WINDOW:
                first_token = ((tile - first_tile) * BLOCK_M) // GROUP
                lo = tl.maximum(len_k - len_q + first_token - window + 1, 0) // BLOCK_N * BLOCK_N
            m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            s = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            for block in range(lo, hi, BLOCK_N):
                key = block + tl.arange(0, BLOCK_N)
                present = key < len_k
                if HAS_INDEX:
                    slot = tl.load(KIDX + k_start + key, mask=present, other=0).to(tl.int64)
                else:
                    slot = (k_start + key).to(tl.int64)
                k = tl.load(K + slot[None, :] * stride_kt + kv_head * stride_kh + dims[:, None], mask=present[None, :], other=0.0)
                scores = tl.dot(q, k) * scale_log2
                allowed = present[None, :] & (key[None, :] <= position[:, None])
                if HAS_WINDOW:
                    allowed = allowed & (key[None, :] > position[:, None] - window)
                scores = tl.where(allowed, scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(scores - m_new[:, None])
                s = s * alpha + tl.sum(p, 1)
                v = tl.load(V + slot[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=present[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            out = acc / tl.maximum(s, 1.0)[:, None]  # s >= 1 on a real row (its max term is 1); rows past the end are 0
            o_ptr = OUT + (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=valid[:, None])

    return attention_kernel
