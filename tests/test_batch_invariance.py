"""Batch invariance on the CPU: an item's rewards are bit-identical (==, not close) whatever it is batched with,
in what order, in what chunks, and whether its prefix was cached or it was reached through `extend`.

The model is wider than the other tiny checkpoints (hidden 256, intermediate 1024): at that width the CPU's
matrix multiplies round differently as the row count changes, so the invariance has something to beat.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_checkpoints
from prmserve import PRM
from prmserve.models.invariant import BlockedLinear, blocked_attention, blocked_linear, rows_invariant

WIDE = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def wide_prm_dir(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-Math-PRM checkpoint's files at a wider shape, random weights."""
    small = checkpoint("qwen_prm")
    out = tmp_path_factory.mktemp("wide_qwen_prm")
    for path in small.iterdir():
        if not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy(path, out / path.name)
    config = json.loads((small / "config.json").read_text()) | WIDE
    (out / "config.json").write_text(json.dumps(config))
    shapes = tiny_checkpoints.backbone_tensor_shapes(config) | tiny_checkpoints._qwen_head(WIDE["hidden_size"], 2)
    tiny_checkpoints.save_sharded_safetensors(out, tiny_checkpoints.random_weights(shapes, seed=3, dtype=torch.bfloat16), shards=2)
    return out


def make_items(count: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    corpus = tiny_checkpoints.math_corpus(200, seed=seed)
    return [{"problem": f"Problem {i}: " + rng.choice(corpus), "steps": rng.sample(corpus, rng.randint(1, 6))} for i in range(count)]


def rewards(results) -> list[list[float]]:
    return [r.step_rewards for r in results]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_bits_whatever_the_batch(wide_prm_dir: Path, dtype: str) -> None:
    items = make_items()
    with PRM(str(wide_prm_dir), device="cpu", dtype=dtype) as prm:
        assert prm.deterministic
        alone = []
        for item in items:  # the reference: each item alone, nothing cached
            prm.reset_prefix_cache()
            alone.append(prm.score([item])[0].step_rewards)
        prm.reset_prefix_cache()
        assert rewards(prm.score(items)) == alone  # one batch, cold
        assert rewards(prm.score(items)) == alone  # again: every full block cached, only the tails computed
        prm.reset_prefix_cache()
        order = list(range(len(items)))
        random.Random(1).shuffle(order)
        mixed: dict[int, list[float]] = {}
        for start in range(0, len(order), 5):  # other neighbours, other order, partly cached
            picked = order[start : start + 5]
            mixed |= dict(zip(picked, rewards(prm.score([items[i] for i in picked], priority=start % 3)), strict=True))
        assert [mixed[i] for i in range(len(items))] == alone
        node = prm.score([{"problem": items[0]["problem"], "steps": items[0]["steps"][:1]}], keep=True)[0]
        if len(items[0]["steps"]) > 1:  # the same item reached through the node API
            assert prm.extend(node.handle, [items[0]["steps"][1:]])[0].step_rewards == alone[0]
    with PRM(str(wide_prm_dir), device="cpu", dtype=dtype, max_num_batched_tokens=24) as chunked:
        assert rewards(chunked.score(items)) == alone  # prefill in 24-token chunks


def test_blocked_kernels_match_the_plain_ones() -> None:
    """The invariant kernels compute the same function: equal to F.linear / SDPA within fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(150, 96, generator=gen), torch.randn(80, 96, generator=gen), torch.randn(80, generator=gen)
    torch.testing.assert_close(blocked_linear(x, w, b), nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-5)
    q, k, v = (torch.randn(140, 4, 32, generator=gen) for _ in range(3))
    for window in (None, 50):
        want = nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=torch.ones(140, 140, dtype=torch.bool).tril() & ~torch.ones(140, 140, dtype=torch.bool).tril(-window)
            if window else torch.ones(140, 140, dtype=torch.bool).tril()).transpose(0, 1)
        got = blocked_attention(q, k, v, 32**-0.5, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(blocked_attention(q[-9:], k, v, 32**-0.5, window), got[-9:])  # cached prefix: same bits


class BatchDependentLinear(nn.Linear):
    """A linear whose rounding depends on the row count, as a library's blocking can make it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (1 + 1e-6 * (x.shape[0] > 8))


def test_rows_invariant_catches_a_batch_dependent_matmul() -> None:
    varying = nn.Sequential(nn.Linear(32, 16))
    varying[0].__class__ = BatchDependentLinear
    blocked = nn.Sequential(nn.Linear(32, 16))
    blocked[0].__class__ = BlockedLinear
    assert rows_invariant(blocked, torch.device("cpu"), torch.float32)
    assert not rows_invariant(varying, torch.device("cpu"), torch.float32)
