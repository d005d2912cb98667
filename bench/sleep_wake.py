"""Sleep mode on one GPU: the memory `PRM.sleep` gives back against what the engine held, the sleep and wake-up
times of both levels, and whether the rewards after waking equal those before. Random bf16 weights in the real
Qwen2.5-Math-PRM files (bench_tree.make_checkpoint), real GSM8K solutions as the items.

    PYTHONPATH=src:bench python bench/sleep_wake.py --shape qwen2.5-math-prm-7b --out sleep_wake.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_tree import load_rows, make_checkpoint
from prmserve import PRM
from prmserve.engine.sleep import device_memory_in_use

GiB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen2.5-math-prm-7b")
    parser.add_argument("--assets", type=Path, default=Path("bench/.assets"))
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    checkpoint = make_checkpoint(args.shape, args.assets, Path(f"/tmp/prmserve-bench-ckpt-{args.shape}"))
    rows = load_rows(args.assets)
    items = [{"problem": r["problem"], "steps": steps} for r in rows for steps in r["solutions"]][: args.items]
    base = device_memory_in_use(device)
    prm = PRM(str(checkpoint))
    want = prm.score(items)
    held = device_memory_in_use(device) - base
    report = {"shape": args.shape, "gpu": torch.cuda.get_device_name(device), "held_gib": held / GiB, "levels": {}}
    for level in (1, 2):
        slept = prm.sleep(level)
        left = device_memory_in_use(device) - base
        started = time.perf_counter()
        prm.wake_up()
        woke = time.perf_counter() - started
        got = prm.score(items)
        worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.step_rewards, w.step_rewards))
        report["levels"][level] = {
            "freed_gib": slept.freed_bytes / GiB, "freed_fraction_of_held": slept.freed_bytes / held,
            "left_on_gpu_gib": left / GiB, "sleep_s": slept.seconds, "wake_up_s": woke,
            "max_reward_difference_after_waking": worst,
        }
        print(json.dumps({level: report["levels"][level]}), flush=True)
    prm.close()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
