"""The Triton attention kernel (TRITON_ATTN) run by Triton's interpreter on the CPU: the same kernel code the GPU
compiles, checked against the SDPA loop, for exact batch invariance (its masking and tile packing), and through a
whole model against TORCH_SDPA. The interpreter has no bfloat16 matrix product, so these run in float32/float16.
conftest.py turns the interpreter on where there is no GPU; elsewhere run them with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import random

import pytest
import torch

from prmserve import PRM
from prmserve.errors import InvalidInputError
from prmserve.models.attention import (
    BACKENDS, FLASH_ATTN, TORCH_SDPA, TRITON_ATTN, AttentionInputs, _sdpa_loop, choose_backend, cumulative_lengths,
)

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def interpreted(monkeypatch: pytest.MonkeyPatch):
    """The kernel under Triton's interpreter."""
    from triton.runtime import interpreter

    from prmserve.models import paged_attention

    # Triton 3.6's interpreter turns a scalar argument into a 1-element array and `range()` calls int() on it,
    # which numpy >= 2.3 refuses; take the element instead (an interpreter quirk, not the compiled kernel's).
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch)
    return paged_attention.paged_attention


def random_batch(lens_q: list[int], lens_k: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
    """Packed queries, a pool of keys/values larger than needed, and each sequence's keys as scattered slots."""
    gen = torch.Generator().manual_seed(seed)
    total_k = sum(lens_k)
    pool = total_k + 37
    q = torch.randn(sum(lens_q), heads, dim, generator=gen).to(dtype)
    keys, values = (torch.randn(pool, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(pool, generator=gen)[:total_k]
    return q, keys, values, slots


def reference(q, keys, values, slots, lens_q, lens_k, window):
    inputs = AttentionInputs(cumulative_lengths(lens_q), cumulative_lengths(lens_k), max(lens_q), max(lens_k),
                             seq_lens_q=lens_q, seq_lens_k=lens_k)
    dim = q.shape[-1]
    return _sdpa_loop(q.double(), keys[slots].double(), values[slots].double(), inputs, dim**-0.5, window)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype", "window"), [
    (14, 2, 64, torch.float32, None),  # 7 query heads per KV head: rows of a tile span several tokens' heads
    (4, 4, 32, torch.float32, None),
    (8, 2, 16, torch.float16, None),
    (6, 3, 32, torch.float32, 50),
])
def test_matches_the_sdpa_loop(interpreted, heads, kv_heads, dim, dtype, window) -> None:
    # Cached prefixes (keys > queries), an empty entry, one-token chunks, a sequence longer than a key block.
    lens_q = [5, 37, 1, 0, 70, 3]
    lens_k = [5, 100, 130, 9, 70, 200]
    q, keys, values, slots = random_batch(lens_q, lens_k, heads, kv_heads, dim, dtype, seed=heads + dim)
    out = interpreted(q, keys, values, slots, cumulative_lengths(lens_q), cumulative_lengths(lens_k), dim**-0.5, window)
    want = reference(q, keys, values, slots, lens_q, lens_k, window)
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < (1e-6 if dtype == torch.float32 else 2e-3), error


def test_keys_in_place_without_an_index(interpreted) -> None:
    """No index: sequence i's keys are rows cu_k[i]:cu_k[i+1] of the key tensor (a step with nothing cached)."""
    lens = [12, 1, 40]
    q, keys, values, _ = random_batch(lens, lens, 4, 2, 32, torch.float32, seed=1)
    keys, values = keys[: sum(lens)].contiguous(), values[: sum(lens)].contiguous()
    cu = cumulative_lengths(lens)
    out = interpreted(q, keys, values, None, cu, cu, 32**-0.5)
    want = reference(q, keys, values, torch.arange(sum(lens)), lens, lens, None)
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-6


def test_a_sequence_gets_the_same_bits_whatever_shares_its_step(interpreted) -> None:
    """One sequence's outputs, alone, after other sequences, and as the second chunk after its cached prefix: ==."""
    heads, kv_heads, dim = 14, 2, 32
    q, keys, values, slots = random_batch([60], [60], heads, kv_heads, dim, torch.float32, seed=5)
    cu = cumulative_lengths([60])
    alone = interpreted(q, keys, values, slots, cu, cu, dim**-0.5)
    # After two other sequences, in the same pool: the sequence's rows now share tiles with theirs.
    oq, _, _, _ = random_batch([9, 20], [9, 33], heads, kv_heads, dim, torch.float32, seed=6)
    other_slots = torch.randint(0, keys.shape[0], (42,), generator=torch.Generator().manual_seed(7))
    mixed = interpreted(torch.cat([oq, q]), keys, values, torch.cat([other_slots, slots]),
                        cumulative_lengths([9, 20, 60]), cumulative_lengths([9, 33, 60]), dim**-0.5)
    assert torch.equal(mixed[29:], alone)
    # Chunked: the last 23 tokens as queries over all 60 keys (the first 37 cached).
    tail = interpreted(q[37:], keys, values, slots, cumulative_lengths([23]), cumulative_lengths([60]), dim**-0.5)
    assert torch.equal(tail, alone[37:])


def test_a_model_gets_the_sdpa_rewards_through_the_kernel(checkpoint) -> None:
    """A whole engine on the kernel (keys by slot after cached prefixes, and the new tokens' own slots when
    nothing is cached), float32 on the CPU: the rewards TORCH_SDPA gives, scored and extended."""
    rng = random.Random(0)
    items = [{"problem": f"What is {a} + {b}?", "steps": [f"{a} + {b} = {a + b}.", "So the answer follows.", "Done."]}
             for a, b in ((rng.randint(1, 99), rng.randint(1, 99)) for _ in range(5))]
    with PRM(str(checkpoint("qwen_prm")), device="cpu", dtype="float32", deterministic=False) as prm:
        assert prm.model.attention_backend == TORCH_SDPA
        want = [r.step_rewards for r in prm.score(items)]
        prm.model.set_attention_kernel(TRITON_ATTN)
        prm.reset_prefix_cache()
        cold = prm.score(items, keep=True)
        warm = prm.score(items)  # every prefix cached: a few new tokens after cached keys
        kids = prm.extend(cold[0].handle, [["One more step."], ["Another.", "And a last one."]])
        prm.release(cold[0].handle)
    for got in ([r.step_rewards for r in cold], [r.step_rewards for r in warm]):
        assert all(abs(a - b) < 1e-5 for x, y in zip(got, want) for a, b in zip(x, y, strict=True))
    with PRM(str(checkpoint("qwen_prm")), device="cpu", dtype="float32", deterministic=False) as plain:
        full = plain.score([dict(items[0], steps=items[0]["steps"] + ["One more step."]),
                            dict(items[0], steps=items[0]["steps"] + ["Another.", "And a last one."])])
    for kid, ref in zip(kids, full):
        assert all(abs(a - b) < 1e-5 for a, b in zip(kid.step_rewards, ref.step_rewards, strict=True))


def test_backend_choice_and_its_errors() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend(cpu, torch.float32, 128) == TORCH_SDPA
    assert choose_backend(cpu, torch.bfloat16, 128, "auto") == TORCH_SDPA
    assert choose_backend(cpu, torch.float32, 128, "torch_sdpa") == TORCH_SDPA
    with pytest.raises(InvalidInputError, match=r"TRITON_ATTN cannot run here \(cpu"):
        choose_backend(cpu, torch.bfloat16, 128, "TRITON_ATTN")
    with pytest.raises(InvalidInputError, match=r"FLASH_ATTN cannot run here \(cpu"):
        choose_backend(cpu, torch.float16, 128, FLASH_ATTN)
    with pytest.raises(InvalidInputError, match="unknown attention backend 'XFORMERS'.*TORCH_SDPA"):
        choose_backend(cpu, torch.float32, 128, "XFORMERS")
    with pytest.raises(InvalidInputError, match="head size 80"):  # no power-of-two head size
        choose_backend(cuda, torch.bfloat16, 80, TRITON_ATTN)
    assert BACKENDS[0] == TRITON_ATTN  # auto prefers it where it runs (a GPU question; bench/ measures it)


def test_a_padded_graph_step_gives_the_real_rows_the_same_bits(interpreted) -> None:
    """A CUDA graph runs the kernel on `cuda_graphs.pad`'s layout (a padding sequence in scratch slots, empty
    entries, filler keys): the real tokens' rows equal those of the unpadded step."""
    import numpy as np

    from prmserve.engine.cuda_graphs import StepArrays, layout, pad

    lens_q, lens_k = [7, 20, 1], [30, 20, 45]
    q, keys, values, slots = random_batch(lens_q, lens_k, 8, 2, 32, torch.float32, seed=9)
    scratch = keys.shape[0]
    pool_k, pool_v = (torch.cat([t, torch.randn(64, 2, 32)]) for t in (keys, values))  # scratch slots past the pool
    cu_k = cumulative_lengths(lens_k)
    own = torch.cat([slots[int(cu_k[i + 1]) - n : int(cu_k[i + 1])] for i, n in enumerate(lens_q)])
    step = StepArrays(np.zeros(28, np.int64), np.zeros(28, np.int64), own.numpy(), slots.numpy(), lens_q, lens_k)
    tokens, key_count, seqs = 48, 128, 16
    packed = torch.from_numpy(pad(step, tokens, key_count, seqs, scratch))
    _, _, _, key_slots, cu_q_pad, cu_k_pad = packed.split(layout(tokens, key_count, seqs))
    q_pad = torch.cat([q, torch.randn(tokens - len(q), 8, 32)])
    padded = interpreted(q_pad, pool_k, pool_v, key_slots, cu_q_pad.to(torch.int32), cu_k_pad.to(torch.int32), 32**-0.5)
    plain = interpreted(q, keys, values, slots, cumulative_lengths(lens_q), cu_k, 32**-0.5)
    assert torch.equal(padded[: len(q)], plain)
