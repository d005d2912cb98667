"""A/B in one process: a held-out workload with `plan_and_submit` streaming a call in growing parts (the
default, above `STREAM_AFTER` items) against planning it whole, alternating, with rewards compared.

Streaming lets the GPU start on the first part while the rest is tokenised, but each part becomes engine steps
of its own; the 1.5B beam replay (128 items a level) was host-bound, 54 engine steps for 12 levels.

    PYTHONPATH=src:bench python bench/stream_after_ab.py --shape qwen2.5-math-prm-1.5b-shape --workload beam
"""

from __future__ import annotations

import statistics

import torch

import bench_heldout
import bench_tree
import prmserve.prm as prm_module


def main() -> None:
    args = bench_heldout.one_process_arguments(__doc__.splitlines()[0], rounds=4).parse_args()
    prm, items = bench_heldout.one_process_workload(args)
    steps: list[int] = []
    prm.engine.step_observers.append(lambda st: steps.append(st.num_tokens))
    arms = {"streamed": prm_module.STREAM_AFTER, "whole": len(items) + 1}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    counts: dict[str, int] = {}
    rewards: dict[str, list] = {}
    for round_ in range(args.rounds):
        for arm in (arms if round_ % 2 == 0 else reversed(arms)):  # ABBA order: drift in the machine cancels
            prm_module.STREAM_AFTER = arms[arm]
            prm.reset_prefix_cache()
            prm.recent.clear()
            steps.clear()
            seconds, results = bench_tree.timed(bench_heldout.score_workload, prm, args.workload, items)
            times[arm].append(seconds)
            counts[arm] = len(steps)
            got = bench_heldout.rewards(results)
            assert rewards.setdefault(arm, got) == got, f"{arm}: rewards changed between rounds"
    prm.close()
    same = sum(a == b for x, y in zip(rewards["streamed"], rewards["whole"]) for a, b in zip(x, y))
    total = sum(len(x) for x in rewards["streamed"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.shape}, {args.workload} ({len(items)} items) on {device}; rewards identical between the arms: {same} of {total}")
    for arm in arms:
        print(f"  {arm:9s} median {1e3 * statistics.median(times[arm]):7.1f} ms  ({', '.join(f'{1e3 * t:.0f}' for t in times[arm])}); "
              f"{counts[arm]} engine steps")
    ratio = statistics.median(times["streamed"]) / statistics.median(times["whole"])
    print(f"  streamed / whole: {ratio:.3f}")


if __name__ == "__main__":
    main()
