"""GPU benchmark: prmserve's engine (prefix cache on and off) against plain `transformers` in one run.

Random-initialised weights of real shapes, workloads of real GSM8K solutions tokenised by a real Qwen2
BPE (bench/make_workloads.py). Each system scores the same token ids; results go to a JSON file.

    python bench/bench_engine.py --shape qwen2.5-math-prm-7b --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch import nn

from prmserve.engine import Engine, EngineConfig, EngineLoop
from prmserve.models.attention import choose_backend
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.loader import StateDictTensors, build_reward_model

HERE = Path(__file__).parent
SHAPES = {
    # Qwen2.5-Math-PRM-7B: ChatML + <extra_0>, 2-logit MLP head.
    "qwen2.5-math-prm-7b": dict(
        format="qwen_prm", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=10000.0, rms_norm_eps=1e-6,
    ),
    # Skywork-o1-Open-PRM-Qwen-2.5-1.5B: line-by-line flags, value head.
    "skywork-o1-prm-1.5b": dict(
        format="skywork_prm", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, rms_norm_eps=1e-6,
    ),
}


def matmul_peak() -> float:
    """Measured bf16 matmul rate (FLOP/s) of this card: 8192^3 on random data, median of 20."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def make_head(fmt: str, hidden: int) -> tuple[nn.Module, HeadSpec, str]:
    if fmt == "qwen_prm":
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)), HeadSpec("mlp", "score", 2), "score"
    return nn.Linear(hidden, 1), HeadSpec("linear", "v_head.summary", 1, bias=True), "v_head.summary"


def rewards_of(fmt: str, head_out: torch.Tensor) -> torch.Tensor:
    """The family's formula, in the model dtype as the reference code runs it."""
    return torch.softmax(head_out, -1)[..., 1] if fmt == "qwen_prm" else torch.sigmoid(head_out[..., 0])


@torch.inference_mode()
def run_transformers(backbone, head, fmt: str, phases: list[list], batch: int = 16) -> tuple[float, list]:
    """Plain transformers as the model cards use it: padded batches of 16, every token recomputed."""
    torch.cuda.synchronize()
    start, first = time.perf_counter(), []
    for phase in phases:
        for i in range(0, len(phase), batch):
            chunk = phase[i : i + batch]
            longest = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), longest, dtype=torch.long)
            mask = torch.zeros(len(chunk), longest, dtype=torch.long)
            for row, (tokens, _) in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            hidden = backbone(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
            rewards = rewards_of(fmt, head(hidden)).cpu()
            out = [rewards[row, reads].float().tolist() for row, (_, reads) in enumerate(chunk)]
            if not first:
                first = out
    torch.cuda.synchronize()
    return time.perf_counter() - start, first


def run_prmserve(loop: EngineLoop, fmt: str, phases: list[list]) -> tuple[float, list, dict]:
    """prmserve's engine: each phase submitted at once (a search depth, a best-of-N batch), then awaited."""
    torch.cuda.synchronize()
    start, first = time.perf_counter(), []
    usage = {"prompt_tokens": 0, "computed_tokens": 0, "cached_tokens": 0}
    for phase in phases:
        futures = loop.submit_many(phase)
        for f in futures:
            request = f.result()
            for key, value in vars(request.usage).items():
                usage[key] += value
            if len(first) < 16:
                first.append(rewards_of(fmt, request.outputs).float().tolist())
    torch.cuda.synchronize()
    return time.perf_counter() - start, first, usage


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--eager", action="store_true", help="skip torch.compile")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="prmserve runs per workload; the fastest counts")
    parser.add_argument("--workloads", default="cold,best_of_n,beam_search")
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2Model

    shape = dict(SHAPES[args.shape])
    fmt = shape.pop("format")
    data = json.loads((args.assets / f"workloads_{fmt}.json").read_text())
    names = args.workloads.split(",")
    torch.manual_seed(0)
    peak = matmul_peak()
    total_mem = torch.cuda.get_device_properties(0).total_memory
    print(f"{torch.cuda.get_device_name()}: measured bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)

    hf_cfg = Qwen2Config(**shape, max_position_embeddings=32768, torch_dtype="bfloat16", attn_implementation="sdpa")
    with torch.device("cuda"):
        backbone = Qwen2Model(hf_cfg).to(torch.bfloat16).eval()
        head, spec, head_name = make_head(fmt, shape["hidden_size"])
        head = head.to(torch.bfloat16).eval()
    params = sum(p.numel() for n, p in backbone.named_parameters() if "embed_tokens" not in n)
    params += sum(p.numel() for p in head.parameters())
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape, "format": fmt, "matmul_peak_flops": peak,
              "matmul_params": params, "torch": torch.__version__, "workloads": {}}

    results = {}
    for name in names:
        phases = data[name]
        prompt = sum(len(ids) for p in phases for ids, _ in p)
        results[name] = {"requests": sum(len(p) for p in phases), "prompt_tokens": prompt}
        if not args.skip_transformers:
            run_transformers(backbone, head, fmt, [phases[0][:32]])  # warm-up
            seconds, first = run_transformers(backbone, head, fmt, phases)
            # The noise floor of bf16 itself: the same model, one sequence at a time instead of padded 16s.
            _, alone = run_transformers(backbone, head, fmt, [phases[0][:16]], batch=1)
            alone = [r for batch in [alone] for r in batch]
            results[name]["transformers"] = {"seconds": seconds, "first_rewards": first,
                                             "max_abs_diff_batch1_vs_batch16": max_diff(alone, first)}
            print(f"[{name}] transformers {seconds:.2f}s  {prompt / seconds:,.0f} tok/s", flush=True)

    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"{head_name}.{k}": v for k, v in head.state_dict().items()}
    cfg = BackboneConfig.from_dict({"model_type": "qwen2", **shape, "max_position_embeddings": 32768})
    model = build_reward_model(cfg, spec, StateDictTensors(state), torch.device("cuda"), torch.bfloat16)
    del backbone, head, state
    gc.collect()
    torch.cuda.empty_cache()
    model.set_attention_kernel(choose_backend(torch.device("cuda"), torch.bfloat16, cfg.head_dim))
    if not args.eager:
        model.compile_layers(args.compile_mode)

    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    loop = EngineLoop(Engine(model, config))
    gen = torch.Generator().manual_seed(1)
    for n in (64, 300, 2000, 9000, 16384):  # compile + autotune outside the timed runs, on random tokens
        lengths = [min(n, 300)] * max(1, n // 300)
        futures = [loop.submit(torch.randint(0, 150000, (k,), generator=gen).tolist(), [k - 1]) for k in lengths]
        [f.result() for f in futures]
    torch.cuda.reset_peak_memory_stats()

    for name in names:
        phases = data[name]
        prompt = results[name]["prompt_tokens"]
        for label, cache in (("prmserve", True), ("prmserve_no_cache", False)):
            loop.engine.blocks.enable_prefix_caching = cache
            runs = []
            for _ in range(args.repeats):  # the fastest of a few runs, each starting cold
                loop.reset_prefix_cache()
                runs.append(run_prmserve(loop, fmt, phases))
            seconds, first, usage = min(runs, key=lambda run: run[0])
            blocks = loop.engine.blocks.num_blocks
            entry = {"seconds": seconds, "all_seconds": [run[0] for run in runs], "tokens_per_s": prompt / seconds,
                     "flop_fraction": 2 * params * prompt / seconds / peak,
                     "computed_over_prompt": usage["computed_tokens"] / prompt, "usage": usage,
                     "kv_blocks": blocks, "first_rewards": first}
            hf = results[name].get("transformers")
            if hf:
                entry["speedup_vs_transformers"] = hf["seconds"] / seconds
                entry["max_abs_diff_vs_transformers"] = max_diff(first, hf["first_rewards"])
            results[name][label] = entry
            print(f"[{name}] {label} {seconds:.2f}s {prompt / seconds:,.0f} tok/s  flop fraction "
                  f"{entry['flop_fraction']:.2f}  computed/prompt {entry['computed_over_prompt']:.3f}  "
                  f"x{entry.get('speedup_vs_transformers', float('nan')):.2f} vs transformers", flush=True)
        hf = results[name].get("transformers")
        if hf:
            hf["tokens_per_s"] = prompt / hf["seconds"]
            hf["flop_fraction"] = 2 * params * prompt / hf["seconds"] / peak
        results[name]["cache_speedup"] = results[name]["prmserve_no_cache"]["seconds"] / results[name]["prmserve"]["seconds"]
    loop.shutdown()
    report["peak_memory_fraction"] = torch.cuda.max_memory_allocated() / total_mem
    report["gpu_memory_utilization"] = args.gpu_memory_utilization
    report["workloads"] = results
    args.out.write_text(json.dumps(report, indent=1))
    print(f"peak memory {report['peak_memory_fraction']:.3f} of the card (configured {args.gpu_memory_utilization})")
    for name, r in results.items():
        print(name, {k: round(v["flop_fraction"], 3) for k, v in r.items() if isinstance(v, dict) and "flop_fraction" in v},
              "cache speedup", round(r["cache_speedup"], 2))


if __name__ == "__main__":
    main()
