"""Where a step's time goes: engine throughput at several batch budgets, and a kernel profile of one run.

    python bench/profile_engine.py --shape skywork-o1-prm-1.5b --budgets 16384,32768,65536
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_engine import HERE, SHAPES, matmul_peak
from prmserve.engine import Engine, EngineConfig, EngineLoop
from prmserve.models.attention import choose_backend
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.transformer import RewardModel


def random_model(shape: dict, head: HeadSpec) -> RewardModel:
    """A model of the given shape with small random weights, built directly on the GPU in bf16."""
    cfg = BackboneConfig.from_dict({"model_type": "qwen2", **shape, "max_position_embeddings": 32768})
    with torch.device("cuda"):
        model = RewardModel(cfg, head).to(torch.bfloat16).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02)
    model.rotary.inv_freq = model.rotary.inv_freq.float()
    model.set_attention_kernel(choose_backend(torch.device("cuda"), torch.bfloat16, cfg.head_dim))
    return model


def timed(loop: EngineLoop, phases: list[list]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for phase in phases:
        [f.result() for f in loop.submit_many(phase)]
    torch.cuda.synchronize()
    return time.perf_counter() - start


def host_timers(engine: Engine) -> dict[str, float]:
    """Wrap the engine's stages with wall-clock timers (schedule, batch prep + launch, read-out)."""
    spent = {"schedule": 0.0, "run": 0.0, "read_outputs": 0.0, "finish_step": 0.0}
    for owner, name in ((engine.scheduler, "schedule"), (engine.runner, "run"), (engine.runner, "read_outputs"),
                        (engine.scheduler, "finish_step")):
        inner = getattr(owner, name)

        def wrapped(*a, _inner=inner, _name=name, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(owner, name, wrapped)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--budgets", default="16384,32768,65536")
    parser.add_argument("--workload", default="cold")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cache", action="store_true", help="prefix caching on")
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    fmt = shape.pop("format")
    head = HeadSpec("mlp", "score", 2) if fmt == "qwen_prm" else HeadSpec("linear", "v_head.summary", 1, bias=True)
    phases = json.loads((HERE / ".assets" / f"workloads_{fmt}.json").read_text())[args.workload]
    prompt = sum(len(ids) for p in phases for ids, _ in p)
    peak = matmul_peak()
    model = random_model(shape, head)
    if not args.eager:
        model.compile_layers(args.compile_mode)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    for budget in [int(b) for b in args.budgets.split(",")]:
        engine = Engine(model, EngineConfig(max_num_batched_tokens=budget, enable_prefix_caching=args.cache))
        loop = EngineLoop(engine)
        timed(loop, [phases[0][:200]])  # warm-up / compile
        engine.reset_prefix_cache()
        spent = host_timers(engine)
        seconds = timed(loop, phases)
        print("host-side seconds:", {k: round(v, 3) for k, v in spent.items()})
        steps = loop.engine.stats().num_steps
        print(f"{args.shape} {args.workload} budget {budget}: {seconds:.2f}s {prompt / seconds:,.0f} tok/s "
              f"flop fraction {2 * params * prompt / seconds / peak:.3f} ({steps} steps)", flush=True)
        if args.profile and budget == int(args.budgets.split(",")[0]):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed(loop, [phases[0][:400]])
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        loop.shutdown()
        del loop
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
