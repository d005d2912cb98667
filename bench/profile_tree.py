"""Where a small tree-search call spends its time: a timeline of `PRM.extend` (plan, submit, engine step
host and GPU parts, wake-up, collect) for 1 and 16 children on a cached node, the kernels of one 16-children
step, the server's share of an HTTP round trip (asyncio/h11 and uvloop/httptools), a stateless beam replay level
by level, plus torch.profiler's top ops; `--beam-only`: the beam replay through `extend`, where the GPU waits.

    python bench/profile_tree.py --checkpoint /tmp/prmserve-bench-ckpt-qwen2.5-math-prm-7b [--threads 1] [--eager] [--http-only | --beam-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import bench_tree
import torch

from prmserve import PRM
from prmserve.engine import cuda_graphs
from prmserve.engine.engine import Engine
from prmserve.engine.model_runner import ModelRunner

STAMPS: dict[str, list[float]] = {}


def stamp(name: str, seconds: float) -> None:
    STAMPS.setdefault(name, []).append(seconds * 1e3)


def wrap(owner, name: str, label: str, gpu: bool = False) -> None:
    """Time every call of owner.name (host), and its GPU span with events when asked."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        out = inner(*args, **kwargs)
        stamp(label, time.perf_counter() - began)
        if gpu:
            end.record()
            end.synchronize()
            stamp(label + " (GPU)", start.elapsed_time(end) / 1e3)
        return out

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=Path(__file__).parent / ".assets")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in this process")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--http-only", action="store_true", help="only the HTTP round trip's parts")
    parser.add_argument("--beam-only", action="store_true", help="only the beam replay through extend: GPU busy and idle time")
    parser.add_argument("--switch-intervals", type=lambda v: [float(x) for x in v.split(",")], default=None,
                        help="with --beam-only: GIL switch intervals (s) to replay under, comma-separated (default: the current)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prm = PRM(str(args.checkpoint), enforce_eager=args.eager)
    wrap(prm, "plan_extend", "plan")
    wrap(prm, "plan_score", "plan (stateless)")
    prm.engine.step_observers.append(lambda st: (stamp("step tokens", st.num_tokens / 1e3), stamp("step seqs", st.num_seqs / 1e3)))
    wrap(prm, "submit_jobs", "submit")
    wrap(prm, "collect", "collect")
    wrap(Engine, "step", "engine.step")
    wrap(prm.engine.scheduler, "schedule", "schedule")
    wrap(prm.engine.runner, "run", "runner.run", gpu=False)
    wrap(ModelRunner, "read_outputs", "read_outputs")
    wrap(ModelRunner, "_copy_slots", "  runner: block copies")  # the parts of runner.run before the launch
    wrap(ModelRunner, "step_arrays", "  runner: step arrays")
    wrap(cuda_graphs, "pad", "  runner: graph pad")
    wrap(torch.Tensor, "pin_memory", "  pin_memory")
    wrap(torch.cuda.CUDAGraph, "replay", "  graph replay")
    rows = bench_tree.load_rows(args.assets)
    problem, steps, pool = bench_tree.node_and_children(rows, prm.tokenizer)
    node = prm.score([{"problem": problem, "steps": steps}], keep=True)[0]
    if args.beam_only:
        beam_gaps(prm, rows, args.switch_intervals or [sys.getswitchinterval()])
        return
    if args.http_only:
        prm.extend(node.handle, bench_tree.children_for(pool, 16, 4100))
        offline = []
        for rep in range(args.reps):
            began = time.perf_counter()
            prm.extend(node.handle, bench_tree.children_for(pool, 16, 4110 + rep))
            offline.append((time.perf_counter() - began) * 1e3)
        print(f"\n== offline extend, 16 children: total median {statistics.median(offline):.1f} ms")
        http_rounds(prm, problem, steps, pool, args.reps)
        return
    calls = {"extend": lambda kids: prm.extend(node.handle, kids),
             "stateless score": lambda kids: prm.score([{"problem": problem, "steps": steps + k} for k in kids])}
    for mode, call in calls.items():
        for count in (1, 16):
            call(bench_tree.children_for(pool, count, 999 + count))
            STAMPS.clear()
            totals = []
            for rep in range(args.reps):
                began = time.perf_counter()
                call(bench_tree.children_for(pool, count, rep + (0 if mode == "extend" else 300)))
                totals.append((time.perf_counter() - began) * 1e3)
            print(f"\n== {mode}: {count} children, {args.reps} calls: total median {statistics.median(totals):.1f} ms "
                  f"(threads {torch.get_num_threads()}, {'eager' if args.eager else 'compiled'})")
            for name, values in STAMPS.items():  # "step tokens"/"step seqs" are counts (printed as stamps x1e3)
                print(f"  {name:24s} median {statistics.median(values):7.2f} ms  x{len(values) / args.reps:.1f} per call")
    if torch.cuda.is_available():  # the kernels inside one 16-children step (a CUDA graph's replay)
        kids = bench_tree.children_for(pool, 16, 777)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            prm.extend(node.handle, kids)
            torch.cuda.synchronize()
        print("\n== one extend of 16 children: GPU kernels")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))
    http_rounds(prm, problem, steps, pool, args.reps)
    problems, levels = bench_tree.beam_levels(rows)
    STAMPS.clear()
    for rep in range(2):  # the whole replay, level by level, stateless: where a level's time goes
        prm.reset_prefix_cache()
        prm.recent.clear()
        began = time.perf_counter()
        bench_tree.beam_with_score(prm, problems, levels)
        took = time.perf_counter() - began
    print(f"\n== beam replay, stateless, its second run: {took * 1e3:.0f} ms for {len(levels)} levels")
    for name, values in STAMPS.items():
        values = values[len(values) // 2 :]  # the second run's
        print(f"  {name:24s} median {statistics.median(values):7.2f} ms  sum {sum(values):8.1f} ms  x{len(values)}")
    if not torch.cuda.is_available():
        return
    level = [{"problem": problems[i], "steps": b + [s]} for i, b, s in levels[3]]
    prm.score(level)  # its prefixes cached, as in the replay
    level = [{"problem": problems[i], "steps": b + [s]} for i, b, s in levels[4]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        prm.score(level)
        torch.cuda.synchronize()
        took = time.perf_counter() - began
    print(f"\n== one beam level, stateless ({len(level)} items; past CUDA graphs' sizes): {took * 1e3:.1f} ms under the profiler")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    cold = [{"problem": r["problem"], "steps": r["solutions"][k % 4]} for k, r in enumerate(rows[:256])]
    prm.score(cold)
    prm.reset_prefix_cache()
    prm.recent.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        prm.score(cold)
        torch.cuda.synchronize()
        took = time.perf_counter() - began
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # the GPU's own events
    gpu = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    print(f"\n== {len(cold)} cold items (cache cleared), one call: {took * 1e3:.0f} ms under the profiler, GPU kernels {gpu * 1e3:.0f} ms "
          f"({gpu / took:.2f} of the wall time)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16))
    prm.close()


def beam_gaps(prm: PRM, rows: list[dict], switch_intervals: list[float]) -> None:
    """bench_tree's beam replay through `extend`: a warm-up; a run under the profiler (GPU activity only), the wall
    time against the union of kernel intervals and the idle gaps between them; then, per GIL switch interval
    (`sys.setswitchinterval`), three timed runs and one with the step timeline (host moments and CUDA events on one
    clock): what each GPU gap before a step was spent on."""
    problems, levels = bench_tree.beam_levels(rows)
    cuda = torch.cuda.is_available()

    def replay(context=contextlib.nullcontext()) -> tuple[float, object]:
        prm.reset_prefix_cache()
        STAMPS.clear()
        with context as entered:
            began = time.perf_counter()
            asyncio.run(bench_tree.beam_with_extend(prm, problems, levels))
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - began, entered

    with GilProbe() as probe:
        took, _ = replay()
    print(f"\n== beam replay through extend, its first run: {took * 1e3:.0f} ms for {len(levels)} levels")
    for name, values in STAMPS.items():
        print(f"  {name:24s} median {statistics.median(values):7.2f} ms  sum {sum(values):8.1f} ms  x{len(values)}")
    probe.report()
    if not cuda:
        return
    took, prof = replay(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]))
    print(f"\n== under the profiler: {took * 1e3:.0f} ms")
    kernel_gaps(prof)
    default = sys.getswitchinterval()
    for interval in switch_intervals:
        sys.setswitchinterval(interval)
        before = allocator_counts()
        runs = [replay()[0] * 1e3 for _ in range(3)]
        changed = {k: v - before.get(k, 0) for k, v in allocator_counts().items() if v != before.get(k, 0)}
        print(f"\n== allocator counters that moved over the next three replays: {changed or 'none'}")
        took, timeline = replay(StepTimeline(prm))
        print(f"\n== GIL switch interval {interval * 1e3:g} ms: replays {', '.join(f'{r:.0f}' for r in runs)} ms; "
              f"with the step timeline {took * 1e3:.0f} ms")
        timeline.report()
    sys.setswitchinterval(default)
    sync_sites(replay)


def allocator_counts() -> dict[str, float]:
    """The CUDA caching allocators' event counters: device allocations, frees and retries (a retry frees cached
    blocks and synchronises), and the pinned host allocator's (a new page-locked block waits for the device)."""
    device = {f"device {k}": v for k, v in torch.cuda.memory_stats().items()
              if k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")}
    host = {f"host {k}": v for k, v in torch.cuda.host_memory_stats().items()
            if isinstance(v, (int, float)) and ("num" in k or "time" in k) and "peak" not in k}
    return device | host


class GilProbe:
    """A thread that sleeps 1 ms at a time and times how late it wakes: waking needs the interpreter lock, so
    long delays mean some thread held it (a call that blocks without releasing it shows as one delay per block)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.stop = threading.Event()

    def __enter__(self) -> GilProbe:
        def run() -> None:
            while not self.stop.is_set():
                began = time.perf_counter()
                time.sleep(0.001)
                self.delays.append((time.perf_counter() - began - 0.001) * 1e3)

        self.thread = threading.Thread(target=run, name="gil-probe", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def report(self) -> None:
        d = sorted(self.delays)
        late = [x for x in d if x >= 1.0]
        print(f"  GIL probe: {len(d)} wake-ups, late by median {statistics.median(d):.2f} ms, p99 {d[int(0.99 * (len(d) - 1))]:.2f}, "
              f"max {d[-1]:.2f}; {len(late)} late by >= 1 ms, {sum(late):.0f} ms in all")


def sync_sites(replay) -> None:
    """One more replay with torch's CUDA sync debug mode on: where a thread waited for the GPU (the engine thread
    should not, the caller's collects do), counted per call site (the innermost prmserve/bench frames)."""
    sites: dict[tuple[str, str], int] = {}

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "prmserve" in f.filename or "bench" in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        key = (threading.current_thread().name, where or f"{filename}:{lineno}")
        sites[key] = sites.get(key, 0) + 1

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            took, _ = replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    print(f"\n== synchronizing CUDA calls in one replay ({took * 1e3:.0f} ms with the sync debug mode on), by thread and site:")
    for (thread, where), count in sorted(sites.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {count:5d}  {thread:16s} {where}")


def kernel_gaps(prof) -> None:
    """The GPU's busy time (union of kernel intervals) and its idle gaps, from a profile."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    busy = sum(end - start for start, end in merged) / 1e3
    gaps = sorted(((b[0] - a[1]) / 1e3 for a, b in zip(merged, merged[1:])), reverse=True)
    window = (merged[-1][1] - merged[0][0]) / 1e3
    print(f"  GPU busy {busy:.0f} ms of the {window:.0f} ms from its first kernel to its last ({busy / window:.2f}); "
          f"idle {window - busy:.0f} ms: {sum(g for g in gaps if g >= 1):.0f} ms in {sum(g >= 1 for g in gaps)} gaps of >= 1 ms, "
          f"{sum(g for g in gaps if 0.1 <= g < 1):.0f} ms in gaps of 0.1-1 ms; the largest: "
          + ", ".join(f"{g:.1f}" for g in gaps[:12]))


class StepTimeline:
    """Each engine step's host moments (entry, the forward's launch, exit) and GPU moments (a CUDA event just
    before the forward's first kernel, one after the step) on one clock, plus the caller's submissions and
    releases (a level's end). A GPU gap before a step splits into: the engine not yet in that step (waiting for
    work or for the GPU), the step's host work before its launch, and the launch's own latency."""

    def __init__(self, prm: PRM) -> None:
        self.prm, self.steps, self.marks = prm, [], []
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> StepTimeline:
        torch.cuda.synchronize()
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        engine, loop = self.prm.engine, self.prm.loop
        current: dict = {}

        def step(_inner=engine.step):
            current.clear()
            current["host_start"] = time.perf_counter()
            done = _inner()
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if "gpu_first" in current:
                self.steps.append(dict(current, host_end=time.perf_counter(), gpu_end=end))
            return done

        def before_launch(owner, name):
            inner = getattr(owner, name)

            def launched(*args, **kwargs):
                if "gpu_first" not in current:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    current.update(host_launch=time.perf_counter(), gpu_first=event)
                return inner(*args, **kwargs)
            return launched

        def marked(owner, name, label):
            inner = getattr(owner, name)

            def call(*args, **kwargs):
                self.marks.append((time.perf_counter(), label))
                return inner(*args, **kwargs)
            return call

        patches = [(engine, "step", step),
                   (torch.cuda.CUDAGraph, "replay", before_launch(torch.cuda.CUDAGraph, "replay")),
                   (engine.runner, "_forward", before_launch(engine.runner, "_forward")),
                   (loop, "_enqueue", marked(loop, "_enqueue", "submit")),
                   (self.prm, "release", marked(self.prm, "release", "level end"))]
        for owner, name, patched in patches:
            self.saved.append((owner, name, owner.__dict__.get(name) if isinstance(owner, type) else None))
            setattr(owner, name, patched)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        for owner, name, original in self.saved:
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance's own patch: the class's method shows through again

    def gpu(self, event: torch.cuda.Event) -> float:
        return self.t0 + self.ref.elapsed_time(event) / 1e3

    def report(self) -> None:
        ends = sorted(t for t, label in self.marks if label == "level end")
        rows, sums = [], {}
        previous_end = None
        for k, s in enumerate(self.steps):
            first, end = self.gpu(s["gpu_first"]), self.gpu(s["gpu_end"])
            level_first = any(previous_end is not None and previous_end < t < s["host_start"] for t in ends)
            if previous_end is not None:
                waiting = max(0.0, s["host_start"] - previous_end)
                prep = max(0.0, s["host_launch"] - max(s["host_start"], previous_end))
                launch = max(0.0, first - max(s["host_launch"], previous_end))
                kind = "level's first step" if level_first else "other steps"
                for name, value in (("engine not in the step", waiting), ("host work before launch", prep), ("launch latency", launch)):
                    sums[(kind, name)] = sums.get((kind, name), 0.0) + value * 1e3
                rows.append((k, level_first, (first - previous_end) * 1e3, waiting * 1e3, prep * 1e3, launch * 1e3, (end - first) * 1e3,
                             (previous_end - s["host_start"]) * 1e3, (s["host_launch"] - s["host_start"]) * 1e3,
                             (s["host_end"] - s["host_launch"]) * 1e3))
            previous_end = end
        print(f"  {len(self.steps)} steps; GPU gaps before a step, split (ms, summed):")
        for (kind, name), value in sorted(sums.items()):
            print(f"    {kind:20s} {name:26s} {value:7.1f}")
        print("  the steps of levels 5-6 (ms): step, level's first, gap, engine not in it, host work, launch latency, GPU span;"
              " then the host's own clock: entered before the GPU went idle, entry to launch, launch to the step's end")
        level_starts = [r[0] for r in rows if r[1]]
        lo, hi = (level_starts[4], level_starts[6]) if len(level_starts) > 6 else (0, len(self.steps))
        for k, first, gap, waiting, prep, launch, span, early, to_launch, after in rows:
            if lo <= k < hi:
                print(f"    {k:3d} {'*' if first else ' '} {gap:6.2f} {waiting:6.2f} {prep:6.2f} {launch:6.2f} {span:7.2f}"
                      f"   {early:7.2f} {to_launch:6.2f} {after:6.2f}")


def http_rounds(prm: PRM, problem: str, steps: list[str], pool: list[str], reps: int) -> None:
    """`http_parts` with asyncio + h11 and with uvicorn's defaults (uvloop + httptools where installed)."""
    try:
        import uvicorn  # noqa: F401

        import prmserve.server.app as app_module
    except ImportError as exc:
        print(f"\n== HTTP parts skipped: {exc}")
        return
    for name in ("_queued", "_run", "_collected"):  # the server's share, timed
        inner = getattr(app_module, name)

        async def timed(*args, _inner=inner, _name=name, **kwargs):
            began = time.perf_counter()
            out = await _inner(*args, **kwargs)
            stamp(f"server {_name}", time.perf_counter() - began)
            return out

        setattr(app_module, name, timed)
    for port, (loop, http) in enumerate((("asyncio", "h11"), ("auto", "auto")), start=8765):
        http_parts(prm, problem, steps, pool, reps, loop, http, port)


def http_parts(prm: PRM, problem: str, steps: list[str], pool: list[str], reps: int, loop: str, http: str, port: int) -> None:
    """16 children through an in-process server and `Client`: where the round trip's time goes on the server.
    (The server's shutdown closes the PRM's engine thread and nodes; the next use starts it again.)"""
    import uvicorn

    from prmserve.client import Client
    from prmserve.server import create_app

    node = prm.score([{"problem": problem, "steps": steps}], keep=True)[0]
    server = uvicorn.Server(uvicorn.Config(create_app(prm), port=port, loop=loop, http=http, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = Client(f"http://127.0.0.1:{port}")
    client.extend(node.handle, bench_tree.children_for(pool, 16, 4242 + 100 * port))
    STAMPS.clear()
    totals = []
    for rep in range(reps):
        began = time.perf_counter()
        client.extend(node.handle, bench_tree.children_for(pool, 16, 4300 + 100 * port + rep))  # new text: no cache hits
        totals.append((time.perf_counter() - began) * 1e3)
    print(f"\n== HTTP extend, 16 children, in-process server ({loop} loop, {http} HTTP): "
          f"total median {statistics.median(totals):.1f} ms")
    for name, values in STAMPS.items():
        print(f"  {name:24s} median {statistics.median(values):7.2f} ms  x{len(values) / reps:.1f} per call")
    server.should_exit = True
    thread.join(30)
    client.close()


if __name__ == "__main__":
    main()
