"""Batch-invariant kernels: a token's outputs do not depend on what else is in its batch.

Matrix-multiply libraries pick their blocking (and on CUDA, split-K) from the number of rows, so the same
token can round differently in a batch of 37 tokens than in one of 512, with or without its prefix cached.
Search compares sibling rewards and RL turns reward gaps into advantages; both notice. Measured here:

- CUDA: cuBLAS without a split-K workspace (``CUBLAS_WORKSPACE_CONFIG=:0:0``) gives identical rows for every
  token count; it must be set before the process's first cuBLAS call. `rows_invariant` checks the result.
- CPU: a matmul of a fixed shape gives a row the same bits wherever it sits in the block, but the library
  blocks differently as the row count changes. `BlockedLinear` always multiplies blocks of `ROWS` rows
  (zero-padded), and `blocked_attention` walks keys in fixed blocks from position 0 with an online softmax,
  so a query's arithmetic depends only on its own keys.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("prmserve")

ROWS = 128  # CPU matmul block: every linear runs on blocks of exactly this many rows
KEYS = 128  # CPU attention: queries and keys in blocks of this size
CUBLAS_SETTING = ":0:0"


def request_cublas_invariance() -> None:
    """Ask cuBLAS for no split-K (read at this process's first cuBLAS call); a user's own setting is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_SETTING)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` computed on blocks of exactly `ROWS` rows, so every row gets the same arithmetic."""
    rows = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    count = flat.shape[0]
    out = flat.new_empty(count, weight.shape[0])
    for start in range(0, count, ROWS):
        block = flat[start : start + ROWS]
        if block.shape[0] < ROWS:
            block = torch.cat([block, block.new_zeros(ROWS - block.shape[0], block.shape[1])])
        out[start : start + ROWS] = F.linear(block, weight, bias)[: count - start]
    return out.reshape(*rows, weight.shape[0])


class BlockedLinear(nn.Linear):
    """nn.Linear whose forward is `blocked_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blocked_linear(x, self.weight, self.bias)


def make_linears_blocked(model: nn.Module) -> int:
    """Switch every plain nn.Linear in `model` to `BlockedLinear` in place; the number switched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BlockedLinear
            count += 1
    return count


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """One sequence's bottom-right causal attention, q [Tq, H, D] over k, v [Tk, H, D] (heads already matched).

    Queries go in blocks of `KEYS`; each block walks key blocks of `KEYS` from position 0 with an online
    softmax. A fully masked key block changes nothing exactly (its weights are 0), so a query's result is
    the same whatever its sequence's length, its neighbours or how much of its prefix was cached.
    """
    len_q, len_k = q.shape[0], k.shape[0]
    offset = len_k - len_q
    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
    key_pos_all = torch.arange(len_k + KEYS, device=q.device)
    for q_start in range(0, len_q, KEYS):
        q_block = qt[:, q_start : q_start + KEYS]
        real = q_block.shape[1]
        if real < KEYS:
            q_block = torch.cat([q_block, q_block.new_zeros(heads, KEYS - real, dim)], dim=1)
        q_pos = torch.arange(q_start, q_start + KEYS, device=q.device)[:, None] + offset
        top = torch.full((heads, KEYS, 1), float("-inf"), dtype=torch.float32, device=q.device)
        total = torch.zeros(heads, KEYS, 1, dtype=torch.float32, device=q.device)
        acc = torch.zeros(heads, KEYS, dim, dtype=torch.float32, device=q.device)
        last_key = min(len_k, q_start + real + offset)  # keys past the block's last query are all masked
        first_key = 0 if sliding_window is None else max(0, q_start + offset - sliding_window + 1)
        for k_start in range((first_key // KEYS) * KEYS, last_key, KEYS):
            k_block, v_block = kt[:, k_start : k_start + KEYS], vt[:, k_start : k_start + KEYS]
            if k_block.shape[1] < KEYS:
                pad = KEYS - k_block.shape[1]
                k_block = torch.cat([k_block, k_block.new_zeros(heads, pad, dim)], dim=1)
                v_block = torch.cat([v_block, v_block.new_zeros(heads, pad, dim)], dim=1)
            k_pos = key_pos_all[k_start : k_start + KEYS][None, :]
            allowed = (k_pos <= q_pos) & (k_pos < len_k)
            if sliding_window is not None:
                allowed &= k_pos > q_pos - sliding_window
            scores = torch.matmul(q_block, k_block.transpose(1, 2)).float() * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            safe_top = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)
            weights = torch.exp(scores - safe_top)
            shrink = torch.exp(torch.where(torch.isinf(top), torch.full_like(top, float("-inf")), top - safe_top))
            total = total * shrink + weights.sum(-1, keepdim=True)
            acc = acc * shrink + torch.matmul(weights.to(v_block.dtype), v_block).float()
            top = new_top
        out[q_start : q_start + real] = (acc / total)[:, :real].transpose(0, 1).to(q.dtype)
    return out


def rows_invariant(model: nn.Module, device: torch.device, dtype: torch.dtype, counts: tuple[int, ...] = (1, 7, 37, 300, 1024)) -> bool:
    """Measure, on this device, whether each distinct linear shape of `model` gives a row the same bits at
    every token count in `counts` (the row at the front and at the back of the batch)."""
    seen: set[tuple[int, int]] = set()
    gen = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        # Row-parallel linears (with a `tp` group) are left out: their forward is a collective all ranks must join.
        if not isinstance(module, nn.Linear) or getattr(module, "tp", None) is not None or module.weight.shape in seen:
            continue
        seen.add(module.weight.shape)
        x = torch.randn(max(counts), module.in_features, device=device, dtype=dtype, generator=gen)
        with torch.inference_mode():
            full = module(x)
            for count in counts:
                if not (torch.equal(module(x[:count]), full[:count]) and torch.equal(module(x[-count:]), full[-count:])):
                    logger.warning("rows of a %s linear differ at %d tokens: rewards depend on batching", tuple(module.weight.shape), count)
                    return False
    return True
