"""TRITON_ATTN against FLASH_ATTN (the pool gather + Flash varlen) at the steps the engine runs, on one GPU.

    python bench/attention_kernels.py [--sweep] [--out attention.json]

For each step shape (7B attention: 28 query heads, 4 KV heads, head size 128, bf16) it reports the median time
of both (CUDA events, `triton.testing.do_bench`), the relative error of each against a float32 reference, and
whether the Triton kernel gives a sequence the same bits alone, after other sequences and as a chunk after its
cached prefix. Keys sit in 16-slot blocks scattered over a pool, as the engine's do. `--sweep` also times other
block shapes of the Triton kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton.testing

from prmserve.models import paged_attention as pa
from prmserve.models.attention import AttentionInputs, _flash_varlen, _sdpa_loop, cumulative_lengths

HEADS, KV_HEADS, DIM, BLOCK = 28, 4, 128, 16
STEPS = {  # (new tokens, keys) per sequence
    "1 child on a 626-token node": [(37, 663)],
    "16 children on a 626-token node": [(44, 670)] * 16,
    "64 children on a 626-token node": [(44, 670)] * 64,
    "beam level: 128 items, ~34 new on 300-1500": [(34, 300 + 9 * i) for i in range(128)],
    "cold: 24 x 340 tokens, nothing cached": [(340, 340)] * 24,
    "long: 2 x 4096 tokens, nothing cached": [(4096, 4096)] * 2,
    "long: 8192-token trace, chunk after 6144 cached": [(2048, 8192)],
}


def make_step(seqs: list[tuple[int, int]], gen: torch.Generator):
    """Queries, a KV pool with each sequence's keys in scattered 16-slot blocks, their slots, cumulative lengths."""
    lens_q, lens_k = [q for q, _ in seqs], [k for _, k in seqs]
    blocks = sum((k + BLOCK - 1) // BLOCK for k in lens_k)
    pool = (blocks + 64) * BLOCK
    order = torch.randperm(pool // BLOCK, generator=gen)[:blocks]
    slots, used = [], 0
    for k in lens_k:
        n = (k + BLOCK - 1) // BLOCK
        table = order[used : used + n]
        used += n
        slots.append((table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:k])
    q = torch.randn(sum(lens_q), HEADS, DIM, generator=gen).to("cuda", torch.bfloat16)
    kv = torch.randn(2, pool, KV_HEADS, DIM, generator=gen).to("cuda", torch.bfloat16)
    return q, kv, torch.cat(slots).cuda(), lens_q, lens_k


def triton_step(q, kv, slots, lens_q, lens_k):
    return pa.paged_attention(q, kv[0], kv[1], slots, cumulative_lengths(lens_q).cuda(), cumulative_lengths(lens_k).cuda(), DIM**-0.5)


def flash_step(q, kv, slots, lens_q, lens_k):
    """What FLASH_ATTN costs per layer: the gather of every sequence's keys out of the pool, then Flash."""
    inputs = AttentionInputs(cumulative_lengths(lens_q).cuda(), cumulative_lengths(lens_k).cuda(), max(lens_q), max(lens_k))
    return _flash_varlen(q, kv[0][slots], kv[1][slots], inputs, DIM**-0.5, None)


def reference(q, kv, slots, lens_q, lens_k):
    inputs = AttentionInputs(cumulative_lengths(lens_q), cumulative_lengths(lens_k), max(lens_q), max(lens_k),
                             seq_lens_q=lens_q, seq_lens_k=lens_k)
    return _sdpa_loop(q.float(), kv[0][slots].float(), kv[1][slots].float(), inputs, DIM**-0.5, None)


def invariance(gen: torch.Generator) -> dict:
    """One sequence's bits alone, after 40 others, and as its last 100 tokens after the rest cached."""
    q, kv, slots, lens_q, lens_k = make_step([(300, 700)] + [(44, 670)] * 40, gen)
    alone = triton_step(q[:300], kv, slots[:700], [300], [700])
    mixed = triton_step(torch.cat([q[300:], q[:300]]), kv, torch.cat([slots[700:], slots[:700]]),
                        lens_q[1:] + [300], lens_k[1:] + [700])
    tail = triton_step(q[200:300], kv, slots[:700], [100], [700])
    return {"after_40_others": bool(torch.equal(mixed[-300:], alone)), "chunk_after_cached": bool(torch.equal(tail, alone[200:]))}


def flops(lens_q: list[int], lens_k: list[int]) -> float:
    """Attention FLOPs (QK and PV, causal: each query sees keys up to its position)."""
    seen = sum(sum(k - q + 1 + i for i in range(q)) for q, k in zip(lens_q, lens_k))
    return 4 * HEADS * DIM * seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "invariance": invariance(gen), "steps": {}}
    print("invariance", report["invariance"], flush=True)
    configs = [(pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES)]
    if args.sweep:
        configs += [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if c != configs[0]]
    for name, seqs in STEPS.items():
        q, kv, slots, lens_q, lens_k = make_step(seqs, gen)
        row = {"tokens": len(q), "keys": len(slots), "flops": flops(lens_q, lens_k)}
        small = len(q) <= 3000
        want = reference(q, kv, slots, lens_q, lens_k) if small else None
        for label, fn in (("flash", flash_step), ("triton", triton_step)):
            out = fn(q, kv, slots, lens_q, lens_k)
            assert not out.isnan().any(), label
            if want is not None:
                row[f"{label}_rel_error"] = ((out.float() - want).norm() / want.norm()).item()
            row[f"{label}_us"] = 1e3 * triton.testing.do_bench(lambda: fn(q, kv, slots, lens_q, lens_k), warmup=25, rep=200,
                                                              return_mode="median")
        sweep = {}
        for bm, bn, warps, stages in configs[1:]:
            saved = (pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES)
            pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES = bm, bn, warps, stages
            try:
                sweep[f"{bm}x{bn} w{warps} s{stages}"] = 1e3 * triton.testing.do_bench(
                    lambda: triton_step(q, kv, slots, lens_q, lens_k), warmup=10, rep=60, return_mode="median")
            except Exception as exc:  # a shape this GPU cannot hold (shared memory): say so, go on
                sweep[f"{bm}x{bn} w{warps} s{stages}"] = repr(exc)[:80]
            finally:
                pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES = saved
        if sweep:
            row["sweep_us"] = sweep
        report["steps"][name] = row
        tflops = lambda us: row["flops"] / us / 1e6  # noqa: E731
        print(f"{name}: flash {row['flash_us']:.1f} us ({tflops(row['flash_us']):.0f} TFLOP/s), "
              f"triton {row['triton_us']:.1f} us ({tflops(row['triton_us']):.0f}), "
              f"errors {row.get('flash_rel_error', float('nan')):.1e} / {row.get('triton_rel_error', float('nan')):.1e}", flush=True)
        if sweep:
            best = sorted((v, k) for k, v in sweep.items() if isinstance(v, float))[:4]
            print("   best of sweep: " + ", ".join(f"{k} {v:.1f}" for v, k in best), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
