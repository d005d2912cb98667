"""The layer's projection writes its new keys and values into the paged KV pool, compiled as served on a GPU
(here Inductor's CPU code): the pool holds at the new slots exactly the keys and values the projection returns (the
eager ones within rounding: fused code rounds differently), nothing else in the pool changes, and the write is in
place (an input mutation the compiler cannot do in place copies the whole pool at every layer of every step)."""

from __future__ import annotations

import time

import pytest
import torch

from prmserve.models.config import BackboneConfig
from prmserve.models.transformer import DecoderLayer, project_qkv

CONFIG = BackboneConfig(
    model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
    attention_bias=True, sliding_window=None, torch_dtype="float32",
)


def _inputs(tokens: int, slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, CONFIG.hidden_size, generator=gen)
    angles = torch.rand(tokens, CONFIG.head_dim, generator=gen)
    return x, angles.cos(), angles.sin(), torch.randperm(slots, generator=gen)[:tokens]


def test_compiled_projection_writes_the_pool_in_place_as_eager_does() -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(CONFIG).eval()
    compiled = torch.compile(project_qkv, dynamic=True)
    small, big = 1024, 1 << 21  # slots; the big pool is 2 x 128 MB
    with torch.inference_mode():
        for tokens in (3, 37):  # two token counts: one compiled graph for both (dynamic shapes)
            x, cos, sin, slots = _inputs(tokens, small, tokens)
            pool = torch.rand(2, 2, small, CONFIG.num_kv_heads, CONFIG.head_dim)
            before = pool.clone()
            want = project_qkv(layer, x, cos, sin)
            q, k, v = compiled(layer, x, cos, sin, pool[1, 0], pool[1, 1], slots)
            for a, b in zip((q, k, v), want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            before[1, 0, slots], before[1, 1, slots] = k, v
            assert torch.equal(pool, before), "the pool is not the old one with the returned keys and values at the new slots"

        def seconds(slot_count: int) -> float:
            x, cos, sin, slots = _inputs(37, slot_count, 1)
            keys, values = (torch.zeros(slot_count, CONFIG.num_kv_heads, CONFIG.head_dim) for _ in range(2))
            compiled(layer, x, cos, sin, keys, values, slots)
            times = []
            for _ in range(5):
                began = time.perf_counter()
                compiled(layer, x, cos, sin, keys, values, slots)
                times.append(time.perf_counter() - began)
            return sorted(times)[2]

        small_s, big_s = seconds(small), seconds(big)
    # Copying 2 x 128 MB takes tens of ms; writing 37 rows in place costs the same whatever the pool's size.
    if big_s > 10 * small_s + 0.01:
        pytest.fail(f"the write into a 2M-slot pool took {1e3 * big_s:.1f} ms against {1e3 * small_s:.2f} ms into a "
                    "1k-slot one: the compiled code copies the pool")
