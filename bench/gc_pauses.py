"""What Python's full garbage collections cost a library user's calls, and what `gc.freeze()` after loading saves.

One process: a held-out workload run `--rounds` times as a program that imports `PRM` gets it (nothing frozen),
then `gc.freeze()` (what prmserve's own commands do once loaded) and `--rounds` more. Every collection is timed
through `gc.callbacks`; each call's time and the collections inside it are printed, with the rewards compared.

    PYTHONPATH=src:bench python bench/gc_pauses.py --shape qwen2.5-math-prm-1.5b-shape --workload beam
"""

from __future__ import annotations

import gc
import statistics

import torch

import bench_heldout
import bench_tree
from prmserve.engine.loop import freeze_heap


def main() -> None:
    args = bench_heldout.one_process_arguments(__doc__.splitlines()[0], rounds=8).parse_args()
    pauses = bench_tree.Pauses()
    prm, items = bench_heldout.one_process_workload(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.shape}, {args.workload} ({len(items)} items) on {device}; {len(gc.get_objects()):,} objects tracked after load")
    first = None
    for arm in ("as loaded", "frozen"):
        if arm == "frozen":
            freeze_heap()
        times, full = [], []
        for _ in range(args.rounds):
            prm.reset_prefix_cache()
            prm.recent.clear()
            pauses.log.clear()
            seconds, results = bench_tree.timed(bench_heldout.score_workload, prm, args.workload, items)
            got = bench_heldout.rewards(results)
            assert first is None or got == first, "rewards changed between calls"
            first = got
            times.append(seconds)
            full.append(pauses.full_seconds())
        print(f"  {arm:9s} median {1e3 * statistics.median(times):7.1f} ms, max {1e3 * max(times):7.1f} ms; full collections "
              f"{1e3 * sum(full):.0f} ms in all ({', '.join(f'{1e3 * s:.0f}' for s in full)} ms a call); "
              f"calls: {', '.join(f'{1e3 * t:.0f}' for t in times)} ms")
    prm.close()


if __name__ == "__main__":
    main()
