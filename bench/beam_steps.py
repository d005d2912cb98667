"""How a beam replay's level is cut into engine steps, and what that costs: the tree bench's replays (stateless
`score` and concurrent `extend`) under the engine's defaults and with each cut undone, in one process.

A 128-item level (~4k new tokens) goes to the GPU as several steps: `PRM.score` queues a call of more than
`STREAM_AFTER` items in parts (so the GPU starts while the rest is tokenised), and the scheduler caps a step at
the CUDA graphs' 2,048 tokens while the queue is short. Each step reads every weight again and fills the GPU's
tiles less well than one big step would; this bench measures whether the overlap pays for that.

    PYTHONPATH=src:bench python bench/beam_steps.py --checkpoint /tmp/prmserve-bench-ckpt-qwen2.5-math-prm-7b [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import bench_tree
import prmserve.prm as prm_module
from prmserve import PRM

# name: (a call queued in one part, no graph-sized step cap)
VARIANTS = {"defaults": (False, False), "one part per call": (True, False), "no graph cap": (False, True),
            "one part, no graph cap": (True, True)}


def run_variant(prm: PRM, name: str, graph_tokens: int | None, problems: list[str], levels: list, reps: int) -> dict:
    """Median seconds and engine steps of both replays with this variant's settings (restored afterwards)."""
    stream_after = prm_module.STREAM_AFTER
    one_part, no_cap = VARIANTS[name]
    if one_part:
        prm_module.STREAM_AFTER = 10**9
    prm.engine.scheduler.graph_tokens = None if no_cap else graph_tokens
    out = {}
    try:
        for replay, call in (("score", lambda: bench_tree.beam_with_score(prm, problems, levels)),
                             ("extend", lambda: asyncio.run(bench_tree.beam_with_extend(prm, problems, levels)))):
            times, steps = [], []
            for _ in range(reps):
                prm.reset_prefix_cache()
                prm.recent.clear()
                before = prm.engine.stats().num_steps
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
                steps.append(prm.engine.stats().num_steps - before)
            out[replay] = {"median_s": statistics.median(times), "min_s": min(times), "steps": statistics.median(steps)}
    finally:
        prm_module.STREAM_AFTER = stream_after
        prm.engine.scheduler.graph_tokens = graph_tokens
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=Path(__file__).parent / ".assets")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prm = PRM(str(args.checkpoint))
    graph_tokens = prm.engine.scheduler.graph_tokens
    problems, levels = bench_tree.beam_levels(bench_tree.load_rows(args.assets))
    run_variant(prm, "defaults", graph_tokens, problems, levels, 1)  # warm: Triton and the allocator
    report = {"graph_tokens": graph_tokens, "stream_after": prm_module.STREAM_AFTER}
    for name in [*VARIANTS, "defaults"]:  # the defaults again last: drift of the machine
        report.setdefault(name, []).append(run_variant(prm, name, graph_tokens, problems, levels, args.reps))
        print(name, json.dumps(report[name][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    prm.close()


if __name__ == "__main__":
    main()
