"""CPU cost of deterministic scoring: the bundled model on 64 GSM8K solutions, plain and deterministic
kernels alternating in one process (each a fresh `PRM`, a 4-item warm-up, then one timed call).

    python bench/make_workloads.py && python bench/cpu_deterministic.py
"""

from __future__ import annotations

import time
from pathlib import Path

import bench_tree
from prmserve import PRM


def main() -> None:
    rows = bench_tree.load_rows(Path(__file__).parent / ".assets")
    items = [{"problem": r["problem"], "steps": r["solutions"][k % 4]} for k, r in enumerate(rows[:64])]
    for deterministic in (False, True, False, True):
        with PRM(device="cpu", deterministic=deterministic) as prm:
            prm.score(items[:4])
            prm.reset_prefix_cache()
            started = time.perf_counter()
            prm.score(items)
            seconds = time.perf_counter() - started
            tokens = sum(len(prm.encode(i).token_ids) for i in items)
            print(f"{'deterministic' if deterministic else 'plain':13s} {seconds:.2f} s  {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
