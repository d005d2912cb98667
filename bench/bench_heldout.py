"""Held-out throughput and drift: what a user gets, on work the engine was not tuned on.

Each engine runs in its own fresh process (load counted apart, no warm-up beyond what loading does), the
engines and the workloads in an order drawn from --seed. Every workload is reported as its first call and
its steady state (the same call again, the prefix cache and recent tokenisations cleared), as a fraction of
the FLOP limit (2 x matmul parameters x prompt tokens / seconds / measured bf16 matmul peak). It also counts the
tokens the engine computed (the rest came from the prefix cache) and gives the same fraction for those alone: how
near a cached workload runs to its own floor. Drift: the
same items scored again in a shuffled batch order in the same process, and cache on against cache off
across processes (identical rewards counted, largest difference).

Workloads, from GSM8K rows the other benchmarks leave out (the tail of the file, reshuffled by seed):
cold (512 solutions), best_of_16 (32 problems x 16 candidates), beam (8 problems, 4x4, 12 deep, every live
candidate re-sent whole: a framework without the node API), long (48 reasoning traces of 2k-8k tokens).

    python bench/make_workloads.py                                     # CPU: writes bench/.assets/
    python bench/bench_heldout.py --shape qwen2.5-math-prm-7b --out heldout.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import bench_tree

HERE = Path(__file__).parent
ENGINES = {  # name: PRM options
    "deterministic": {},
    "deterministic_no_cache": {"enable_prefix_caching": False},
    "fast": {"deterministic": False},
    "fast_no_cache": {"deterministic": False, "enable_prefix_caching": False},
}


def heldout_workloads(rows: list[dict], tokenizer, seed: int) -> dict[str, list[dict]]:
    """Items of each workload, drawn from rows the other benchmarks don't use, in a seeded order."""
    rng = random.Random(seed)
    pool = rows[-900:]  # bench_tree and make_workloads take the head of the file
    rng.shuffle(pool)
    out = {"cold": [{"problem": r["problem"], "steps": r["solutions"][rng.randrange(5)]} for r in pool[:512]]}
    best = []
    for r in pool[512:544]:
        cands = [list(s) for s in r["solutions"]]
        while len(cands) < 16:
            a, b = rng.sample(r["solutions"], 2)
            cands.append(a[: rng.randint(1, len(a))] + b[rng.randrange(len(b)) :])
        best += [{"problem": r["problem"], "steps": c} for c in cands]
    out["best_of_16"] = best
    problems, levels = bench_tree.beam_levels(pool[544:552], problems=8, depth=12, width=4, seed=seed)
    out["beam"] = [{"problem": problems[i], "steps": b + [s], "level": n} for n, level in enumerate(levels) for i, b, s in level]
    steps = [s for r in pool[552:] for sol in r["solutions"] for s in sol]
    long = []
    for k in range(48):
        target, trace, length = rng.randint(2000, 8000), [], 0
        while length < target:
            step = steps[rng.randrange(len(steps))]
            trace.append(step)
            length += len(tokenizer.encode(step)) + 1
        long.append({"problem": pool[552 + k]["problem"], "steps": trace})
    out["long"] = long
    return out


def one_process_arguments(description: str, rounds: int) -> argparse.ArgumentParser:
    """The arguments of the one-process A/B scripts (stream_after_ab, gc_pauses): a shape, one of this bench's
    workloads (its items, its seed) and how many rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", choices=bench_tree.SHAPES, default="qwen2.5-math-prm-1.5b-shape")
    parser.add_argument("--workload", choices=["cold", "best_of_16", "beam", "long"], default="beam")
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prmserve-bench-ckpt"))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seed", type=int, default=2026)
    return parser


def one_process_workload(args: argparse.Namespace):
    """(PRM, items) for `one_process_arguments`: the shape's checkpoint (built once), loaded on the GPU if there is one."""
    import torch

    from prmserve import PRM

    checkpoint = bench_tree.make_checkpoint(args.shape, args.assets, args.checkpoint.with_name(f"{args.checkpoint.name}-{args.shape}"))
    prm = PRM(str(checkpoint), **({} if torch.cuda.is_available() else {"device": "cpu"}))
    return prm, heldout_workloads(bench_tree.load_rows(args.assets), prm.tokenizer, args.seed)[args.workload]


def score_workload(prm, name: str, items: list[dict]) -> list:
    """The items' results; one call per workload, the beam replay one call per level, as a search loop sends it."""
    if name != "beam":
        return prm.score(items)
    out: list = []
    for level in sorted({item["level"] for item in items}):
        out += prm.score([{"problem": i["problem"], "steps": i["steps"]} for i in items if i["level"] == level])
    return out


def rewards(results: list) -> list[list[float]]:
    return [r.step_rewards for r in results]


def phase(args) -> dict:
    """One engine in this fresh process: load, then every workload (first, steady, shuffled order)."""
    import torch

    from prmserve import PRM
    from prmserve.engine.loop import freeze_heap

    pauses = bench_tree.Pauses()  # full garbage collections inside each timed call (a library user's process freezes nothing)
    started = time.perf_counter()
    prm = PRM(str(args.checkpoint), **ENGINES[args.engine], attention_backend=args.attention_backend,
              **({} if torch.cuda.is_available() else {"device": "cpu"}))
    if args.freeze_heap:  # what a program that follows the README does once loaded (prmserve's commands do it too)
        freeze_heap()
    report = {"load_s": time.perf_counter() - started, "deterministic": prm.deterministic, "freeze_heap": args.freeze_heap,
              "attention_backend": prm.model.attention_backend, "workloads": {}}
    workloads = heldout_workloads(bench_tree.load_rows(args.assets), prm.tokenizer, args.seed)
    if args.limit:  # a smoke run: the first items of each workload (the beam's first levels)
        workloads = {k: v[: args.limit] for k, v in workloads.items()}
    order = list(workloads)
    random.Random(args.seed + zlib.crc32(args.engine.encode())).shuffle(order)
    report["order"] = order
    for name in order:
        items = workloads[name]
        entry = {"items": len(items), "prompt_tokens": sum(len(prm.encode(i).token_ids) for i in items)}
        prm.reset_prefix_cache()
        prm.recent.clear()
        pauses.log.clear()
        entry["first_s"], first = bench_tree.timed(score_workload, prm, name, items)
        entry["first_gc_s"] = pauses.full_seconds()
        prm.reset_prefix_cache()
        prm.recent.clear()
        pauses.log.clear()
        entry["steady_s"], steady = bench_tree.timed(score_workload, prm, name, items)
        entry["steady_gc_s"] = pauses.full_seconds()
        # What the engine computed (the rest came from the prefix cache): the replay's floor is 2 x params x these.
        entry["computed_tokens"] = sum(r.usage.computed_tokens for r in steady)
        first, steady = rewards(first), rewards(steady)
        # The same items in another batch order (beam: its levels keep their order, items within them shuffle).
        perm = list(range(len(items)))
        random.Random(args.seed + 7).shuffle(perm)
        if name == "beam":
            perm.sort(key=lambda i: items[i]["level"])
        prm.reset_prefix_cache()
        shuffled = rewards(score_workload(prm, name, [items[i] for i in perm]))
        again = [None] * len(items)
        for position, index in enumerate(perm):
            again[index] = shuffled[position]
        entry["order_drift"] = drift(steady, again)
        entry["first_matches_steady"] = drift(first, steady)
        (args.rewards_dir / f"{args.engine}-{name}.json").write_text(json.dumps(steady))
        report["workloads"][name] = entry
    prm.close()
    return report


def drift(a: list[list[float]], b: list[list[float]]) -> dict:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return {"identical": sum(x == y for x, y in pairs), "of": len(pairs), "max_abs_diff": max(abs(x - y) for x, y in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=bench_tree.SHAPES, default="qwen2.5-math-prm-7b")
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prmserve-bench-ckpt"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # run one engine in this process
    parser.add_argument("--attention-backend", default="auto", help="every engine's attention kernel (TRITON_ATTN, FLASH_ATTN, ...)")
    parser.add_argument("--limit", type=int, default=0, help="items per workload (a smoke run); 0: all")
    parser.add_argument("--freeze-heap", action="store_true",
                        help="gc.freeze() once each engine has loaded, as the README advises a program of its own (off: a plain library user)")
    parser.add_argument("--rewards-dir", type=Path, default=Path("/tmp/prmserve-heldout-rewards"))
    args = parser.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(phase(args)), flush=True)
        return

    args.checkpoint = args.checkpoint.with_name(f"{args.checkpoint.name}-{args.shape}")
    bench_tree.make_checkpoint(args.shape, args.assets, args.checkpoint)
    args.rewards_dir.mkdir(parents=True, exist_ok=True)
    dims = bench_tree.SHAPES[args.shape]
    h, i, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    report: dict = {"shape": args.shape, "seed": args.seed, "attention_backend": args.attention_backend,
                    "matmul_params": layers * (2 * h * h + 2 * kv * h + 3 * h * i) + h * h + 2 * h}
    import torch

    if torch.cuda.is_available():
        from bench_engine import matmul_peak

        report["device"] = torch.cuda.get_device_name()
        report["matmul_peak_flops"] = matmul_peak()
        torch.cuda.empty_cache()
    engines = args.engines.split(",")
    random.Random(args.seed).shuffle(engines)
    report["engine_order"] = engines
    for engine in engines:
        command = [sys.executable, __file__, "--engine", engine, "--shape", args.shape, "--assets", str(args.assets),
                   "--checkpoint", str(args.checkpoint), "--out", str(args.out), "--seed", str(args.seed),
                   "--rewards-dir", str(args.rewards_dir), "--limit", str(args.limit),
                   "--attention-backend", args.attention_backend] + (["--freeze-heap"] if args.freeze_heap else [])
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"engine {engine} failed ({done.returncode}):\n{done.stderr[-4000:]}", flush=True)
            report[engine] = {"error": done.stderr[-2000:]}
            continue
        report[engine] = json.loads(lines[-1][len("RESULT "):]) | {"process_s": time.perf_counter() - started}
        args.out.write_text(json.dumps(report, indent=1))
    ran = {e for e in engines if "error" not in report[e]}
    for mode in ("deterministic", "fast"):  # cache on against cache off, the same items (this run's files only)
        if not {mode, f"{mode}_no_cache"} <= ran:
            continue
        for name in ("cold", "best_of_16", "beam", "long"):
            on, off = (args.rewards_dir / f"{e}-{name}.json" for e in (mode, f"{mode}_no_cache"))
            if on.is_file() and off.is_file():
                report.setdefault("cache_drift", {}).setdefault(mode, {})[name] = drift(json.loads(on.read_text()), json.loads(off.read_text()))
    args.out.write_text(json.dumps(report, indent=1))
    summarize(report)


def summarize(report: dict) -> None:
    peak, params = report.get("matmul_peak_flops") or float("nan"), report["matmul_params"]
    print(f"\n== held-out benchmark: {report.get('device', 'CPU')} {report['shape']} seed {report['seed']}; engines in order {report['engine_order']}")
    for engine in report["engine_order"]:
        r = report.get(engine, {})
        if "error" in r:
            print(f"{engine}: failed")
            continue
        frozen = ", heap frozen after load" if r.get("freeze_heap") else ""
        print(f"{engine}: load {r['load_s']:.1f} s, deterministic {r['deterministic']}{frozen}, workloads in order {r['order']}")
        for name, w in r["workloads"].items():
            fl = lambda s: 2 * params * w["prompt_tokens"] / s / peak  # noqa: E731
            od = w["order_drift"]
            computed = w.get("computed_tokens")
            on_computed = (f"  computed {computed:,} ({2 * params * computed / w['steady_s'] / peak:.2f} of peak)"
                           if computed is not None else "")
            gc_note = "".join(f"  {when} call had {w[f'{when}_gc_s']:.2f} s of full garbage collections"
                              for when in ("first", "steady") if w.get(f"{when}_gc_s", 0) > 0.01)
            print(f"  {name:11s} {w['prompt_tokens']:>9,} tokens  first {w['first_s']:6.2f} s ({fl(w['first_s']):.2f} of limit)  "
                  f"steady {w['steady_s']:6.2f} s ({fl(w['steady_s']):.2f})  other order: {od['identical']}/{od['of']} identical, "
                  f"max {od['max_abs_diff']:.2g}{on_computed}{gc_note}")
    for mode, table in report.get("cache_drift", {}).items():
        print(f"cache on vs off ({mode}): " + "; ".join(f"{n} {d['identical']}/{d['of']} identical, max {d['max_abs_diff']:.2g}" for n, d in table.items()))
    for mode in ("deterministic", "fast"):
        on, off = report.get(mode, {}).get("workloads", {}), report.get(f"{mode}_no_cache", {}).get("workloads", {})
        if "beam" in on and "beam" in off:
            a, b = on["beam"], off["beam"]
            print(f"beam, {mode}: cache on {a['steady_s']:.2f} s vs off {b['steady_s']:.2f} s ({b['steady_s'] / a['steady_s']:.1f}x); "
                  f"first calls {a['first_s']:.2f} s vs {b['first_s']:.2f} s ({b['first_s'] / a['first_s']:.1f}x)")


if __name__ == "__main__":
    main()
