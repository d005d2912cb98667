"""The decoder backbone shared by Qwen2, Qwen3, Llama and Mistral, plus a reward head on top.

Each layer is split into three parts: projections + rotary and the new keys' write into the paged cache
(`project`), attention over that cache (`attend`), and output projection + MLP (`finish`). The first and last
are plain tensor code that `torch.compile` fuses well; attention stays eager around its kernel
(`prmserve.models.attention`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prmserve.models.attention import FLASH_ATTN, TORCH_SDPA, TRITON_ATTN, AttentionInputs, causal_attention
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec, build_head
from prmserve.models.invariant import make_linears_blocked
from prmserve.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from prmserve.models.paged_attention import paged_attention
from prmserve.parallel.group import TensorParallelGroup
from prmserve.parallel.layers import column_parallel, row_parallel


class SelfAttention(nn.Module):
    """Grouped-query self-attention with fused QKV that writes to and reads from a paged KV cache.

    Split across ranks (`tp`), each rank holds its share of the KV heads and their query heads.
    """

    def __init__(self, cfg: BackboneConfig, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        ranks = 1 if tp is None else tp.world_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads // ranks, cfg.num_kv_heads // ranks, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        full_q, full_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = column_parallel(cfg.hidden_size, full_q + 2 * full_kv, cfg.attention_bias, tp)
        self.o_proj = row_parallel(full_q, cfg.hidden_size, tp)
        # Qwen3 normalises every query and key head (over head_dim) before the rotary embedding.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.backend = TORCH_SDPA
        self.blocked = False  # the batch-invariant CPU kernel (RewardModel.use_blocked_kernels)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, kv: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend over the sequence's keys: the new ones `k`, `v`, or with a cache `kv` [2, slots, Hkv, D] (where
        `project_qkv` wrote the new keys) those at the sequences' slots."""
        index = None  # TRITON_ATTN reads keys in the pool by slot: those listed, else the new tokens'
        if kv is not None:
            if self.backend == TRITON_ATTN:
                k, v, index = kv[0], kv[1], inputs.slot_mapping if inputs.key_slots is None else inputs.key_slots
            elif inputs.key_slots is not None:  # some sequence follows a cached prefix
                k, v = kv[0][inputs.key_slots], kv[1][inputs.key_slots]
        if self.backend == TRITON_ATTN:
            out = paged_attention(q, k, v, index, inputs.cu_seqlens_q, inputs.cu_seqlens_k, self.scale, self.sliding_window)
        else:
            out = causal_attention(q, k, v, inputs, self.scale, self.sliding_window, self.backend == FLASH_ATTN, self.blocked)
        return out.reshape(-1, self.q_size)


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: BackboneConfig, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, tp)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inputs: AttentionInputs,
        kv: torch.Tensor | None,
        project: Callable | None = None,
        finish: Callable | None = None,
    ) -> torch.Tensor:
        if kv is None:
            q, k, v = (project or project_qkv)(self, x, cos, sin)
        else:  # the layer's key and value pools as separate inputs: compiled code then writes them in place
            q, k, v = (project or project_qkv)(self, x, cos, sin, kv[0], kv[1], inputs.slot_mapping)
        attn = self.self_attn.attend(q, k, v, inputs, kv)
        return (finish or finish_layer)(self, x, attn)


def project_qkv(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_pool: torch.Tensor | None = None,
    value_pool: torch.Tensor | None = None, slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV projection, per-head q/k norm (Qwen3) and rotary embedding: queries [T,H,D], keys and values [T,Hkv,D].

    With the layer's pools [slots, Hkv, D], the new keys and values are also written at `slots`: compiled, the write
    is part of the rotary kernel instead of two scatter kernels a layer (each pool must be an input of its own, not
    a view taken in here, or the compiled code copies the whole pool).
    """
    attn = layer.self_attn
    q, k, v = attn.qkv_proj(layer.input_layernorm(x)).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = q.view(-1, attn.num_heads, attn.head_dim), k.view(-1, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v = v.reshape(-1, attn.num_kv_heads, attn.head_dim).contiguous()  # kernels want it dense
    if key_pool is not None:
        key_pool[slots] = k
        value_pool[slots] = v
    return q, k, v


def finish_layer(layer: DecoderLayer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Output projection and residual, then the MLP block and its residual."""
    x = x + layer.self_attn.o_proj(attn)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class RewardModel(nn.Module):
    """Backbone + head: token ids of packed sequences in, one head output row per token out.

    With `tp` it is one rank's part of the model: its share of every layer's heads and MLP; only rank 0 has
    the head (the other ranks compute `hidden_states` alone).
    """

    def __init__(self, cfg: BackboneConfig, head: HeadSpec, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.head_spec = head
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.num_kv_heads = cfg.num_kv_heads // (1 if tp is None else tp.world_size)  # this rank's: its KV pool's width
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.head = build_head(head, cfg.hidden_size) if tp is None or tp.is_driver else None
        self._project: Callable = project_qkv
        self._finish: Callable = finish_layer
        self.attention_backend = TORCH_SDPA

    def set_attention_kernel(self, backend: str) -> None:
        """Choose every layer's attention kernel: TRITON_ATTN, FLASH_ATTN (CUDA) or TORCH_SDPA (`attention_backend`)."""
        self.attention_backend = backend
        for layer in self.layers:
            layer.self_attn.backend = backend

    def use_blocked_kernels(self) -> None:
        """CPU batch invariance: every linear on fixed blocks of rows, attention on fixed key blocks."""
        make_linears_blocked(self)
        for layer in self.layers:
            layer.self_attn.blocked = True

    def compile_layers(self, mode: str | None = None) -> None:
        """Compile the per-layer tensor code once for all layers, for any token count."""
        self._project = torch.compile(project_qkv, dynamic=True, mode=mode)
        self._finish = torch.compile(finish_layer, dynamic=True, mode=mode)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Head outputs [T, head width] for packed tokens [T] at their absolute positions [T]."""
        return self.head(self.norm(self.hidden_states(input_ids, positions, inputs)))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """The last layer's output [T, hidden] (before the final norm), new keys and values written to the cache."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            kv = None if inputs.kv_cache is None else inputs.kv_cache[index]
            x = layer(x, cos, sin, inputs, kv, self._project, self._finish)
        return x
