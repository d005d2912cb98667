"""Where a held-out workload's wall time goes on the GPU: busy and idle time of one call (the kernels' union), the
wait before the first kernel and after the last, the idle gaps by size, kernel time by kind, and the host's
plan / engine-step / collect time, for `bench_heldout.py`'s workloads (its items, its seed).

    python bench/profile_heldout.py --shape qwen2.5-math-prm-1.5b-shape --workloads cold,beam
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from pathlib import Path

import torch

import bench_heldout
import bench_tree
from prmserve import PRM

KINDS = [("GEMM", re.compile(r"nvjet|gemm|cutlass|sm90_xmma|ampere_", re.I)), ("attention", re.compile(r"attention|flash", re.I)),
         ("SiLU*mul", re.compile(r"silu")), ("RMSNorm", re.compile(r"rsqrt")), ("rotary", re.compile(r"neg_slice|cat_mul")),
         ("copies", re.compile(r"memcpy|memset|copy_|index|scatter|gather", re.I)), ("other", re.compile(""))]
MARK = "heldout_call"
# The engine step's host-side parts (the GPU runs asynchronously: these are Python and launch time, or a wait
# where the launch queue is full).
STEP_PARTS = [("scheduler", "schedule"), ("scheduler", "finish_step"), ("runner", "step_arrays"), ("runner", "_forward"),
              ("runner", "read_outputs")]


def timeline(prof, call_s: float) -> dict:
    """The kernels' union over the call: busy seconds, the lead before the first kernel, the tail after the last, gaps."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
                     and e.name != MARK)  # the call's own range shows on the GPU timeline too: not a kernel
    marks = [e for e in prof.events() if e.name == MARK and e.device_type == torch.autograd.DeviceType.CPU]
    begin, end = marks[0].time_range.start, marks[0].time_range.end
    busy, gaps, last = 0.0, [], None
    by_kind: dict[str, float] = {}
    for start, stop, name in kernels:
        kind = next(k for k, pattern in KINDS if pattern.search(name))
        by_kind[kind] = by_kind.get(kind, 0.0) + (stop - start) / 1e6
        if last is None:
            busy += stop - start
        elif start > last:
            gaps.append(start - last)
            busy += stop - start
        elif stop > last:
            busy += stop - last
        last = stop if last is None else max(last, stop)
    sizes = {"<0.1 ms": 0.0, "0.1-1 ms": 0.0, "1-10 ms": 0.0, ">10 ms": 0.0}
    for g in gaps:
        key = "<0.1 ms" if g < 100 else "0.1-1 ms" if g < 1000 else "1-10 ms" if g < 10000 else ">10 ms"
        sizes[key] += g / 1e6
    return {"wall_s": call_s, "busy_s": busy / 1e6, "lead_s": (kernels[0][0] - begin) / 1e6 if kernels else None,
            "tail_s": (end - last) / 1e6 if kernels else None, "gaps_s": sizes, "gap_count": len(gaps),
            "kernels_s": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=bench_tree.SHAPES, default="qwen2.5-math-prm-7b")
    parser.add_argument("--assets", type=Path, default=bench_heldout.HERE / ".assets")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prmserve-bench-ckpt"))
    parser.add_argument("--workloads", default="cold,beam")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--no-cache", action="store_true", help="the prefix cache off (the cache-off engine)")
    parser.add_argument("--table", action="store_true", help="also print torch.profiler's kernel table")
    parser.add_argument("--sort", default="self_cuda_time_total", help="the table's order, e.g. self_cpu_time_total for host time")
    args = parser.parse_args()
    checkpoint = bench_tree.make_checkpoint(args.shape, args.assets, args.checkpoint.with_name(f"{args.checkpoint.name}-{args.shape}"))
    prm = PRM(str(checkpoint), enable_prefix_caching=not args.no_cache, **({} if torch.cuda.is_available() else {"device": "cpu"}))
    host: dict[str, float] = {}

    def clock(owner, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **k):
            began = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                host[name] = host.get(name, 0.0) + time.perf_counter() - began
        setattr(owner, name, timed)

    for name in ("plan_score", "collect"):
        clock(prm, name)
    clock(prm.engine, "step")
    for owner, name in STEP_PARTS:
        clock(getattr(prm.engine, owner), name)
    steps: list[int] = []
    prm.engine.step_observers.append(lambda st: steps.append(st.num_tokens))
    workloads = bench_heldout.heldout_workloads(bench_tree.load_rows(args.assets), prm.tokenizer, args.seed)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name in args.workloads.split(","):
        items = workloads[name]
        for rep in ("first", "profiled"):
            prm.reset_prefix_cache()
            prm.recent.clear()
            host.clear()
            steps.clear()
            with torch.profiler.profile(activities=activities) if rep == "profiled" else contextlib.nullcontext() as prof:
                began = time.perf_counter()
                with torch.profiler.record_function(MARK):
                    bench_heldout.score_workload(prm, name, items)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                took = time.perf_counter() - began
            print(f"\n== {name}, {rep} call: {took * 1e3:.0f} ms, {len(steps)} engine steps of {sum(steps):,} tokens; host: "
                  + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in host.items()), flush=True)
        if torch.cuda.is_available():
            t = timeline(prof, took)
            print(f"   GPU busy {t['busy_s'] * 1e3:.0f} ms ({t['busy_s'] / took:.2f} of the call, under the profiler), "
                  f"first kernel after {t['lead_s'] * 1e3:.1f} ms, last one {t['tail_s'] * 1e3:.1f} ms before the end; "
                  f"{t['gap_count']} gaps: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t["gaps_s"].items()))
            print("   kernels: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t["kernels_s"].items()))
            if args.table:
                print(prof.key_averages().table(sort_by=args.sort, row_limit=20, max_name_column_width=60))
    prm.close()


if __name__ == "__main__":
    main()
