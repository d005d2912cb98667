"""The decoder backbone shared by Qwen2, Llama and Mistral, plus a reward head on top."""

from __future__ import annotations

import torch
from torch import nn

from prmserve.models.attention import AttentionInputs, causal_attention
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec, build_head
from prmserve.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary


class SelfAttention(nn.Module):
    """Grouped-query self-attention with fused QKV that writes to and reads from a paged KV cache."""

    def __init__(self, cfg: BackboneConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.use_varlen = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if inputs.kv_cache is not None:
            cache_k, cache_v = inputs.kv_cache[self.layer_index]
            cache_k[inputs.slot_mapping] = k
            cache_v[inputs.slot_mapping] = v
            if inputs.key_slots is not None:  # some sequence follows a cached prefix
                k, v = cache_k[inputs.key_slots], cache_v[inputs.key_slots]
        out = causal_attention(q, k, v, inputs, self.scale, self.sliding_window, self.use_varlen)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: BackboneConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class RewardModel(nn.Module):
    """Backbone + head: token ids of packed sequences in, one head output row per token out."""

    def __init__(self, cfg: BackboneConfig, head: HeadSpec) -> None:
        super().__init__()
        self.config = cfg
        self.head_spec = head
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.head = build_head(head, cfg.hidden_size)

    def set_attention_kernel(self, use_varlen: bool) -> None:
        """Choose the Flash varlen kernel (CUDA) or the portable SDPA loop for every layer."""
        for layer in self.layers:
            layer.self_attn.use_varlen = use_varlen

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Head outputs [T, head width] for packed tokens [T] at their absolute positions [T]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, inputs)
        return self.head(self.norm(x))
