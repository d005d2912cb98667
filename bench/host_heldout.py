"""Host-side cost of a held-out workload through `PRM`, the forward stubbed out: tokenising and planning in the
caller, scheduling, prefix matching, index building and result hand-off in the engine. On a GPU this is the work
the GPU waits for between steps; the 1.5B beam replay spent most of its call here (bench/notes/gpu_2026-12-07-heldout.md).
CPU only, the tiny shape's checkpoint and the real Qwen2 BPE (`python bench/make_workloads.py` first).

    PYTHONPATH=src:bench python bench/host_heldout.py --workload beam [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

import bench_heldout
import bench_tree
from prmserve import PRM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["cold", "best_of_16", "beam", "long"], default="beam")
    parser.add_argument("--assets", type=Path, default=bench_heldout.HERE / ".assets")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prmserve-host-heldout-tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the caller and the engine thread")
    args = parser.parse_args()
    bench_tree.make_checkpoint("tiny", args.assets, args.checkpoint)
    prm = PRM(str(args.checkpoint), device="cpu")
    width = prm.engine.runner.head_cache.shape[1]
    prm.engine.runner._forward = lambda ids, positions, inputs: torch.zeros((ids.shape[0], width))  # no compute
    items = bench_heldout.heldout_workloads(bench_tree.load_rows(args.assets), prm.tokenizer, args.seed)[args.workload]
    caller, engine = cProfile.Profile(), cProfile.Profile()
    if args.profile:  # the engine thread's steps, profiled where they run
        step = prm.loop._step

        def profiled_step() -> None:
            engine.enable()
            try:
                step()
            finally:
                engine.disable()
        prm.loop._step = profiled_step
    times = []
    for _ in range(args.repeats):
        prm.reset_prefix_cache()
        prm.recent.clear()
        if args.profile:
            caller.enable()
        began = time.perf_counter()
        bench_heldout.score_workload(prm, args.workload, items)
        times.append(time.perf_counter() - began)
        caller.disable()
    prm.close()
    print(f"{args.workload}, host side only: median {1e3 * statistics.median(times):.0f} ms over {args.repeats} calls "
          f"({', '.join(f'{1e3 * t:.0f}' for t in times)} ms; {len(items)} items)")
    if args.profile:
        for name, prof, key in (("caller", caller, "cumulative"), ("engine thread", engine, "tottime")):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(25)
            print(f"== {name} (cProfile, all calls)\n{out.getvalue()}")


if __name__ == "__main__":
    main()
