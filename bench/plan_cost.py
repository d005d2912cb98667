"""Host cost of planning a tree search's children (tokenising, checking, building requests), CPU only: 16 children of
a node of N steps through `plan_extend` and through a stateless `plan_score` that re-sends the node's text. Neither
should grow with N (issue #11: no host work that grows with what the node already holds).

    PYTHONPATH=src:bench python bench/plan_cost.py [--node-steps 10 60] [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bench_tree
from prmserve import PRM


def median_ms(call, reps: int) -> float:
    times = []
    for rep in range(reps):
        started = time.perf_counter()
        call(rep)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path(__file__).parent / ".assets")
    parser.add_argument("--node-steps", type=int, nargs="+", default=[10, 60])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = bench_tree.make_checkpoint("tiny", args.assets, Path(tempfile.gettempdir()) / "prmserve-bench-ckpt-tiny")
    prm = PRM(str(checkpoint), device="cpu", dtype="float32")
    problem = "A shop sells pens in boxes of 12 and pencils in boxes of 20. " * 4
    for count in args.node_steps:
        node = [f"Step {i}: we compute {i} + {i} = {2 * i} and carry it to the next line of work." for i in range(count)]
        kept = prm.score([{"problem": problem, "steps": node}], keep=True)[0]
        kids = lambda rep: [[f"Child {rep}-{k}: so the answer is {k}."] for k in range(16)]  # noqa: E731
        extend = median_ms(lambda rep: prm.plan_extend(kept.handle, kids(rep)), args.reps)
        stateless = median_ms(lambda rep: prm.plan_score([{"problem": problem, "steps": node + k} for k in kids(rep)]), args.reps)
        print(f"node of {count} steps: plan_extend 16 children {extend:.2f} ms, stateless plan_score {stateless:.2f} ms")
        prm.release(kept.handle)
    prm.close()


if __name__ == "__main__":
    main()
