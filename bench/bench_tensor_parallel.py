"""GPU benchmark of tensor parallelism: the Qwen2.5-Math-PRM-72B shape at `--tp N`, through the public `PRM` API.

Random bf16 weights in the real Qwen2.5-Math-PRM file layout (`bench_tree.make_checkpoint`), each rank reading
its slices from disk; `--layers K` keeps the 72B layer shape with fewer layers (the disk and load time shrink,
the per-layer work is the same). The cold and beam-search workloads of `bench/make_workloads.py` (real GSM8K
solutions, real Qwen2 BPE) go to the engine as token ids, each phase at once, the fastest of `--repeats` cold
runs counting. FLOP limit = 2 x matmul parameters x prompt tokens / (N x this card's measured bf16 matmul rate);
above 1.0 means cached tokens were not recomputed.

    python bench/make_workloads.py                                          # CPU: writes bench/.assets/
    python bench/bench_tensor_parallel.py --tp 4 --out bench/results/tp/72b-tp4.json [--layers 80]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bench_tree
from bench_engine import matmul_peak
from prmserve import PRM

HERE = Path(__file__).parent
SHAPE_72B = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)


def matmul_params(cfg) -> int:
    """Parameters the tokens multiply through: every layer's projections and the 2-label MLP head."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * h + 2 * h


def run(prm: PRM, phases: list[list]) -> tuple[float, dict]:
    """Seconds to score the phases, each submitted at once and awaited (a search depth, a cold batch), and the usage."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    usage = {"prompt_tokens": 0, "computed_tokens": 0, "cached_tokens": 0}
    for phase in phases:
        for future in prm.loop.submit_many(phase):
            for key, value in vars(future.result().usage).items():
                usage[key] += value
    torch.cuda.synchronize()
    return time.perf_counter() - start, usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, required=True, help="tensor_parallel_size")
    parser.add_argument("--layers", type=int, default=SHAPE_72B["num_hidden_layers"])
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--workloads", default="cold,beam_search")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    shape = f"qwen2.5-math-prm-72b-{args.layers}-layers"
    bench_tree.SHAPES[shape] = {**SHAPE_72B, "num_hidden_layers": args.layers}
    started = time.perf_counter()
    checkpoint = bench_tree.make_checkpoint(shape, args.assets, args.checkpoint_dir / f"prmserve-bench-ckpt-{shape}")
    written = time.perf_counter() - started
    peak = matmul_peak()
    started = time.perf_counter()
    prm = PRM(str(checkpoint), tensor_parallel_size=args.tp, gpu_memory_utilization=args.gpu_memory_utilization)
    loaded = time.perf_counter() - started
    params = matmul_params(prm.config)
    data = json.loads((args.assets / "workloads_qwen_prm.json").read_text())
    report = {"device": torch.cuda.get_device_name(), "gpus": args.tp, "shape": shape, "matmul_peak_flops_per_gpu": peak,
              "matmul_params": params, "checkpoint_write_s": written, "load_s": loaded,
              "kv_blocks": prm.engine.blocks.num_blocks, "workloads": {}}
    print(f"{report['device']} x {args.tp}: {peak / 1e12:.0f} TFLOP/s each; {shape} loaded in {loaded:.0f} s", flush=True)
    for name in args.workloads.split(","):
        phases = data[name]
        prompt = sum(len(ids) for phase in phases for ids, _ in phase)
        runs = []
        for _ in range(args.repeats):
            prm.reset_prefix_cache()
            runs.append(run(prm, phases))
        seconds, usage = min(runs, key=lambda r: r[0])
        entry = {"prompt_tokens": prompt, "seconds": seconds, "all_seconds": [r[0] for r in runs],
                 "flop_fraction": 2 * params * prompt / seconds / (args.tp * peak),
                 "computed_over_prompt": usage["computed_tokens"] / prompt}
        report["workloads"][name] = entry
        print(f"[{name}] {prompt} tokens in {seconds:.2f} s: {entry['flop_fraction']:.2f} of the FLOP limit "
              f"(computed / prompt {entry['computed_over_prompt']:.2f})", flush=True)
    report["peak_memory_gb_rank0"] = torch.cuda.max_memory_allocated() / 1e9
    prm.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
