"""Causal attention over packed variable-length sequences, each query block after its cached prefix.

Three kernels compute the same function (vLLM's backend names): TRITON_ATTN, our Triton kernel that reads keys
in the KV pool in place (`prmserve.models.paged_attention`, CUDA); FLASH_ATTN, Flash through
`torch.nn.attention.varlen` on keys gathered out of the pool (CUDA); TORCH_SDPA, a loop of
`scaled_dot_product_attention` calls (CPU, CI). Queries are aligned to the end of their keys (bottom-right
causal), so a chunk that follows a cached prefix attends to it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prmserve.errors import InvalidInputError
from prmserve.models.invariant import blocked_attention
from prmserve.models.paged_attention import supports_head_dim, triton_available

TRITON_ATTN, FLASH_ATTN, TORCH_SDPA = "TRITON_ATTN", "FLASH_ATTN", "TORCH_SDPA"
BACKENDS = (TRITON_ATTN, FLASH_ATTN, TORCH_SDPA)


@functools.cache
def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    """The Flash varlen kernel (torch >= 2.10), imported on first CUDA use: its module loads torch._dynamo (~1 s)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


@functools.cache
def _varlen_gqa() -> bool:
    """Whether this torch's varlen kernel takes an `enable_gqa` flag."""
    return "enable_gqa" in inspect.signature(_varlen_attn()).parameters


@dataclass
class AttentionInputs:
    """Where a packed batch's sequences start and where their keys live.

    `cu_seqlens_q`/`cu_seqlens_k` are int32 cumulative lengths [N+1] of new tokens and of all keys
    (cached prefix + new). With a KV cache, new keys are written at `slot_mapping` [T] and each
    sequence's keys are gathered from `key_slots` [Tk]; without one, keys are the new tokens.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kv_cache: torch.Tensor | None = None  # [layers, 2, slots, kv_heads, head_dim]
    slot_mapping: torch.Tensor | None = None
    key_slots: torch.Tensor | None = None
    seq_lens_q: list[int] | None = None  # host copies, for the loop kernel
    seq_lens_k: list[int] | None = None

    @classmethod
    def uncached(cls, lengths: list[int], device: torch.device | str) -> "AttentionInputs":
        """Inputs for full sequences with no cache: each sequence attends to itself only."""
        cu = cumulative_lengths(lengths).to(device)
        longest = max(lengths)
        return cls(cu, cu, longest, longest, seq_lens_q=list(lengths), seq_lens_k=list(lengths))


def cumulative_lengths(lengths: list[int]) -> torch.Tensor:
    """int32 [N+1] starts of packed sequences: 0, l0, l0+l1, ..."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the Flash varlen kernel can run: CUDA, a recent torch, and 16-bit activations."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int, requested: str | None = None) -> str:
    """The kernel to use: `requested` if it can run here (else a clear error), by default the first that can.

    TRITON_ATTN needs CUDA, Triton, 16-bit activations and a power-of-two head size; FLASH_ATTN needs CUDA and
    a torch with varlen Flash; TORCH_SDPA runs anywhere.
    """
    cuda16 = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    runs = {TRITON_ATTN: cuda16 and triton_available() and supports_head_dim(head_dim),
            FLASH_ATTN: varlen_available(device, dtype), TORCH_SDPA: True}
    usable = [name for name in BACKENDS if runs[name]]
    name = "AUTO" if requested is None else requested.upper()
    if name == "AUTO":
        return usable[0]
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown attention backend {requested!r}: choose one of auto, {', '.join(BACKENDS)}")
    if name not in usable:
        raise InvalidInputError(f"attention backend {name} cannot run here ({device.type}, {dtype}, head size "
                                f"{head_dim}); these can: {', '.join(usable)}")
    return name


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: AttentionInputs,
    scale: float,
    sliding_window: int | None,
    use_varlen: bool,
    blocked: bool = False,
) -> torch.Tensor:
    """Attention of q [T, H, D] over k, v [Tk, Hkv, D], bottom-right causal per sequence.

    `blocked` (CPU): the batch-invariant kernel of `prmserve.models.invariant` instead of SDPA.
    """
    if use_varlen:
        return _flash_varlen(q, k, v, inputs, scale, sliding_window)
    return _sdpa_loop(q, k, v, inputs, scale, sliding_window, blocked)


@functools.cache
def _kernel_takes_gqa_as_is(device: torch.device) -> bool:
    """Whether Flash accepts fewer KV heads without an `enable_gqa` flag: checked once against repeated heads."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(9, 4, 64, device=device, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(9, 2, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    kernel = _varlen_attn()
    want = kernel(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 5, 5, window_size=(-1, 0))
    try:
        got = kernel(q, k, v, cu, cu, 5, 5, window_size=(-1, 0))
    except RuntimeError:
        return False
    return bool(torch.equal(got, want))


def _flash_varlen(q, k, v, inputs: AttentionInputs, scale: float, sliding_window: int | None) -> torch.Tensor:
    left = -1 if sliding_window is None else sliding_window - 1
    kwargs = {"scale": scale, "window_size": (left, 0)}
    if q.shape[1] != k.shape[1]:
        if _varlen_gqa():
            kwargs["enable_gqa"] = True
        elif not _kernel_takes_gqa_as_is(q.device):  # else: repeat KV heads, at the cost of copies
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _varlen_attn()(
        q, k, v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.max_seqlen_q, inputs.max_seqlen_k, **kwargs
    )


def _sdpa_loop(q, k, v, inputs: AttentionInputs, scale: float, sliding_window: int | None, blocked: bool = False) -> torch.Tensor:
    lens_q = inputs.seq_lens_q or torch.diff(inputs.cu_seqlens_q).tolist()
    lens_k = inputs.seq_lens_k or torch.diff(inputs.cu_seqlens_k).tolist()
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    start_q = start_k = 0
    for len_q, len_k in zip(lens_q, lens_k):
        if len_q == 0:  # an empty entry (padded batches): nothing to compute
            start_k += len_k
            continue
        if blocked:
            ki = k[start_k : start_k + len_k].repeat_interleave(group, dim=1)
            vi = v[start_k : start_k + len_k].repeat_interleave(group, dim=1)
            out[start_q : start_q + len_q] = blocked_attention(q[start_q : start_q + len_q], ki, vi, scale, sliding_window)
            start_q += len_q
            start_k += len_k
            continue
        qi = q[start_q : start_q + len_q].transpose(0, 1)
        ki = k[start_k : start_k + len_k].transpose(0, 1).repeat_interleave(group, dim=0)
        vi = v[start_k : start_k + len_k].transpose(0, 1).repeat_interleave(group, dim=0)
        if len_q == len_k and sliding_window is None:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=_mask(len_q, len_k, sliding_window, q.device), scale=scale)
        out[start_q : start_q + len_q] = oi.transpose(0, 1)
        start_q += len_q
        start_k += len_k
    return out


def _mask(len_q: int, len_k: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [len_q, len_k]: query i sits at key position i + (len_k - len_q)."""
    query_pos = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    key_pos = torch.arange(len_k, device=device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= key_pos > query_pos - sliding_window
    return allowed
