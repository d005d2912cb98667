"""Tree-search benchmark: node latency (1/16/64 children on a cached ~600-token node), beam replay through
`extend`, and the first call after load, each system in a fresh process, side by side in one run.

Random weights of a real shape in the real Qwen2.5-Math-PRM on-disk layout, loaded by the public `PRM`
API (the first call counted); real GSM8K text and a real Qwen2 BPE from `bench/make_workloads.py`.

    python bench/make_workloads.py                                    # CPU: writes bench/.assets/
    python bench/bench_tree.py --shape qwen2.5-math-prm-7b --out tree.json [--http]

Phases (each a fresh `python bench/bench_tree.py --phase ...` process): `prmserve` (load, first and later
512-item calls, extend / stateless score / beam replay), `no_cache` (the engine with the prefix cache
off), `transformers` (plain transformers, padded batches of 16), `http` (`prmserve serve` + `Client`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SHAPES = {
    "qwen2.5-math-prm-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4),
    "qwen2.5-math-prm-1.5b-shape": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                        num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
CHILD_COUNTS = (1, 16, 64)


# Workloads, all from the solutions' text ------------------------------------------------------


def load_rows(assets: Path) -> list[dict]:
    return json.loads((assets / "gsm8k_solutions.json").read_text())


def node_and_children(rows: list[dict], tokenizer, node_tokens: int = 600, child_tokens: tuple[int, int] = (30, 50)):
    """A ~600-token node (a problem and real steps) and a pool of real ~40-token steps for children."""
    problem = rows[0]["problem"]
    steps: list[str] = []
    for row in rows:
        for step in (s for sol in row["solutions"] for s in sol):
            steps.append(step)
            if sum(len(tokenizer.encode(s)) for s in steps) + len(tokenizer.encode(problem)) >= node_tokens:
                break
        else:
            continue
        break
    pool = [s for row in rows[1:] for sol in row["solutions"] for s in sol
            if child_tokens[0] <= len(tokenizer.encode(s)) <= child_tokens[1]]
    return problem, steps, pool


def children_for(pool: list[str], count: int, rep: int) -> list[list[str]]:
    """`count` distinct one-step children; the rep number makes every repetition new text (no cache hits)."""
    return [[f"({rep}.{i}) {pool[(rep * 131 + i) % len(pool)]}"] for i in range(count)]


def beam_levels(rows: list[dict], problems: int = 8, depth: int = 12, width: int = 4, seed: int = 0):
    """A replayed beam search: per level, each live beam expands into `width` children (16 at the root);
    `width` random survivors per problem. Returns per level: [(problem index, parent path, child step)]."""
    rng = random.Random(seed)
    chosen = rows[-problems:]
    beams = {i: [[]] for i in range(problems)}
    levels = []
    for _ in range(depth):
        level, kids = [], {}
        for i, row in enumerate(chosen):
            pool = [s for sol in row["solutions"] for s in sol]
            fan = width if beams[i] != [[]] else width * width
            kids[i] = [(b, s) for b in beams[i] for s in rng.sample(pool, min(fan, len(pool)))]
            level += [(i, b, s) for b, s in kids[i]]
        levels.append(level)
        beams = {i: [b + [s] for b, s in rng.sample(k, min(width, len(k)))] for i, k in kids.items()}
    return [r["problem"] for r in chosen], levels


# The checkpoint --------------------------------------------------------------------------------


def make_checkpoint(shape: str, assets: Path, out: Path) -> Path:
    """Random bf16 weights of the shape in Qwen2.5-Math-PRM's files: config, safetensors, tokenizer."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").is_file():  # written last: a half-written checkpoint is rebuilt
        return out
    out.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    config = {"architectures": ["Qwen2ForProcessRewardModel"], "model_type": "qwen2", "vocab_size": 152064,
              "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, **dims}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for source in (assets / "qwen2-tokenizer").iterdir():  # tokenizer.json, its config, the chat template
        (out / source.name).write_bytes(source.read_bytes())
    h, i, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)

    def rand(*size: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * scale).to(torch.bfloat16).cpu()

    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(152064, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    shard |= {"score.0.weight": rand(h, h), "score.0.bias": rand(h), "score.2.weight": rand(2, h), "score.2.bias": rand(2)}
    save_file(shard, out / "model-00000.safetensors", metadata={"format": "pt"})
    index = dict.fromkeys(shard, "model-00000.safetensors")
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shard = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.q_proj.bias": rand(h),
                 p + "self_attn.k_proj.weight": rand(kv, h), p + "self_attn.k_proj.bias": rand(kv),
                 p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.v_proj.bias": rand(kv),
                 p + "self_attn.o_proj.weight": rand(h, h), p + "mlp.gate_proj.weight": rand(i, h),
                 p + "mlp.up_proj.weight": rand(i, h), p + "mlp.down_proj.weight": rand(h, i),
                 p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-{layer + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        index |= dict.fromkeys(shard, name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


# Phases ----------------------------------------------------------------------------------------


class Pauses:
    """Each collection's generation and seconds, from `gc.callbacks`."""

    def __init__(self) -> None:
        self.began = 0.0
        self.log: list[tuple[int, float]] = []
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.began = time.perf_counter()
        else:
            self.log.append((info["generation"], time.perf_counter() - self.began))

    def full_seconds(self) -> float:
        """Seconds of full (generation 2) collections logged since the log was last cleared."""
        return sum(seconds for generation, seconds in self.log if generation == 2)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - started, value


def latency_table(call, pool: list[str], reps: int, offset: int = 0) -> dict:
    """Median and p90 milliseconds of `call(children)` for 1/16/64 children, new text every repetition."""
    out = {}
    for count in CHILD_COUNTS:
        call(children_for(pool, count, rep=10_000 + offset + count))  # one untimed call per size
        times = [timed(call, children_for(pool, count, offset + rep))[0] * 1e3 for rep in range(reps)]
        out[str(count)] = {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
                           "min_ms": min(times)}
    return out


def phase_prmserve(args) -> dict:
    from prmserve import PRM

    started = time.perf_counter()
    prm = PRM(str(args.checkpoint), **args.engine_options)
    report = {"load_s": time.perf_counter() - started}
    rows = load_rows(args.assets)
    cold = [{"problem": r["problem"], "steps": r["solutions"][k % 4]} for k, r in enumerate(rows[: args.cold])]
    report["first_call_s"], _ = timed(prm.score, cold)
    prm.reset_prefix_cache()
    prm.recent.clear()  # the same work again: no cached KV, and the items tokenised anew
    report["later_call_s"], _ = timed(prm.score, cold)
    report["first_over_later"] = report["first_call_s"] / report["later_call_s"]
    report["cold_prompt_tokens"] = sum(len(prm.encode(item).token_ids) for item in cold)

    problem, node_steps, pool = node_and_children(rows, prm.tokenizer)
    node = prm.score([{"problem": problem, "steps": node_steps}], keep=True)[0]
    report["node_tokens"] = node.usage.prompt_tokens
    report["child_tokens_mean"] = statistics.mean(len(prm.tokenizer.encode(s)) for s in pool)
    report["extend"] = latency_table(lambda kids: prm.extend(node.handle, kids), pool, args.reps)
    report["stateless_score"] = latency_table(  # other children than extend's, so none is cached already
        lambda kids: prm.score([{"problem": problem, "steps": node_steps + k} for k in kids]), pool, args.reps, offset=500)

    problems, levels = beam_levels(rows)
    prm.reset_prefix_cache()
    before = prm.engine.stats()
    report["beam_extend_s"], beam_rewards = timed(asyncio.run, beam_with_extend(prm, problems, levels))
    # Tokens the GPU had to compute (the rest were cached): 2 x params x these is the replay's FLOP floor.
    report["beam_extend_computed_tokens"] = prm.engine.stats().computed_tokens - before.computed_tokens
    report["beam_extend_steps"] = prm.engine.stats().num_steps - before.num_steps
    prm.reset_prefix_cache()
    before = prm.engine.stats()
    report["beam_score_s"], score_rewards = timed(beam_with_score, prm, problems, levels)
    report["beam_score_computed_tokens"] = prm.engine.stats().computed_tokens - before.computed_tokens
    report["beam_score_steps"] = prm.engine.stats().num_steps - before.num_steps
    report["beam_prompt_tokens"] = sum(
        len(prm.encode({"problem": problems[i], "steps": b + [s]}).token_ids) for level in levels for i, b, s in level)
    # bf16: the same paths scored in other batches and chunks differ by rounding (see the README's bf16 notes).
    report["beam_extend_vs_score_max_diff"] = max(
        abs(a - b) for path, x in beam_rewards.items() for a, b in zip(x, score_rewards[path], strict=True))
    pairs = [(a, b) for path, x in beam_rewards.items() for a, b in zip(x, score_rewards[path], strict=True)]
    report["beam_extend_vs_score_identical"] = f"{sum(a == b for a, b in pairs)} of {len(pairs)}"
    report["deterministic"] = prm.deterministic
    report["attention_backend"] = prm.model.attention_backend
    graphs = prm.engine.runner.graphs
    report["cuda_graph_replays"] = graphs.replays if graphs is not None else 0
    prm.close()
    return report


async def beam_with_extend(prm, problems: list[str], levels: list) -> dict[tuple, list[float]]:
    """Each level: one `extend` per live beam (concurrently, as a search framework's workers would),
    kept children; the survivors' handles carry on, the rest are released. Rewards by (problem, path)."""
    handles: dict[tuple[int, tuple[str, ...]], str] = {}
    rewards = {}
    for level in levels:
        by_parent: dict[tuple[int, tuple[str, ...]], list[str]] = {}
        for i, parent, step in level:
            by_parent.setdefault((i, tuple(parent)), []).append(step)
        calls = []
        for (i, parent), steps in by_parent.items():
            if parent:
                calls.append(prm.extend_async(handles[(i, parent)], [[s] for s in steps], keep=True))
            else:
                calls.append(prm.score_async([{"problem": problems[i], "steps": [s]} for s in steps], keep=True))
        results = await asyncio.gather(*calls)
        new_handles = {}
        for ((i, parent), steps), kids in zip(by_parent.items(), results):
            for step, kid in zip(steps, kids):
                new_handles[(i, parent + (step,))] = kid.handle
                rewards[(i, parent + (step,))] = kid.step_rewards
        prm.release(list(handles.values()))
        handles = new_handles
    prm.release(list(handles.values()))
    return rewards


def beam_with_score(prm, problems: list[str], levels: list) -> dict[tuple, list[float]]:
    """Each level: every live candidate re-sent whole in one stateless `score` call. Rewards by (problem, path)."""
    rewards = {}
    for level in levels:
        results = prm.score([{"problem": problems[i], "steps": b + [s]} for i, b, s in level])
        rewards |= {(i, tuple(b) + (s,)): r.step_rewards for (i, b, s), r in zip(level, results)}
    return rewards


def phase_no_cache(args) -> dict:
    from prmserve import PRM

    prm = PRM(str(args.checkpoint), enable_prefix_caching=False, **args.engine_options)
    rows = load_rows(args.assets)
    problems, levels = beam_levels(rows)
    seconds, _ = timed(beam_with_score, prm, problems, levels)
    prm.close()
    return {"beam_score_s": seconds}


def phase_transformers(args) -> dict:
    """transformers' Qwen2Model + the score head, padded batches of 16, every token recomputed."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, Qwen2Model

    from prmserve.formats.qwen_prm import QwenPRMFormat
    from prmserve.models.config import BackboneConfig

    tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint))
    fmt = QwenPRMFormat(tokenizer, BackboneConfig.from_file(args.checkpoint))
    started = time.perf_counter()
    backbone = Qwen2Model.from_pretrained(str(args.checkpoint), dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    h = backbone.config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2)).to("cuda", torch.bfloat16)
    index = json.loads((args.checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(args.checkpoint / index["score.0.weight"], "pt", device="cuda") as f:
        head.load_state_dict({k.removeprefix("score."): f.get_tensor(k) for k in f.keys() if k.startswith("score.")})
    load_s = time.perf_counter() - started
    rows = load_rows(args.assets)
    problems, levels = beam_levels(rows)

    @torch.inference_mode()
    def run() -> list[list[float]]:
        rewards: list[list[float]] = []
        for level in levels:
            encoded = [fmt.encode(problems[i], b + [s]) for i, b, s in level]
            for start in range(0, len(encoded), 16):
                chunk = encoded[start : start + 16]
                longest = max(len(e.token_ids) for e in chunk)
                ids = torch.zeros(len(chunk), longest, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, e in enumerate(chunk):
                    ids[row, : len(e.token_ids)] = torch.tensor(e.token_ids)
                    mask[row, : len(e.token_ids)] = 1
                hidden = backbone(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
                probs = torch.softmax(head(hidden), -1)[..., 1].cpu()
                rewards += [probs[row, e.read_positions].float().tolist() for row, e in enumerate(chunk)]
        torch.cuda.synchronize()
        return rewards

    first_s, _ = timed(run)
    later_s, _ = timed(run)
    return {"load_s": load_s, "beam_first_s": first_s, "beam_later_s": later_s}


def phase_http(args) -> dict:
    """`prmserve serve` in its own process; the node API through `Client` over loopback HTTP."""
    import httpx

    from prmserve import Client

    port = 8765
    log = open(args.out.with_suffix(".server.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "prmserve", "serve", str(args.checkpoint), "--port", str(port),
                               "--disable-log-requests", "--attention-backend", args.attention_backend]
                              + (["--no-deterministic"] if args.no_deterministic else []), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        while time.perf_counter() - started < 540:
            if server.poll() is not None:  # its last log lines say why (a missing package, a port in use)
                log.flush()
                tail = Path(log.name).read_text().strip().splitlines()[-3:]
                raise SystemExit(f"server exited {server.returncode}: " + " | ".join(tail))
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        report = {"server_ready_s": time.perf_counter() - started}
        rows = load_rows(args.assets)
        from transformers import AutoTokenizer

        problem, node_steps, pool = node_and_children(rows, AutoTokenizer.from_pretrained(str(args.checkpoint)))
        with Client(url) as client:
            node = client.score([{"problem": problem, "steps": node_steps}], keep=True)[0]
            report["extend"] = latency_table(lambda kids: client.extend(node.handle, kids), pool, args.reps)
            report["stateless_score"] = latency_table(
                lambda kids: client.score([{"problem": problem, "steps": node_steps + k} for k in kids]), pool, args.reps, offset=500)
        return report
    finally:
        server.terminate()
        server.wait(60)


PHASES = {"prmserve": phase_prmserve, "no_cache": phase_no_cache, "transformers": phase_transformers, "http": phase_http}


def summarize(report: dict) -> None:
    p, nc, hf = ({} if "error" in report.get(k, {}) else report.get(k, {}) for k in ("prmserve", "no_cache", "transformers"))
    peak = report.get("matmul_peak_flops")
    print("\n== tree-search benchmark:", report.get("device", "?"), report["shape"])
    if p:
        print(f"load {p['load_s']:.1f} s; first {report['cold_items']}-item call {p['first_call_s']:.2f} s, later {p['later_call_s']:.2f} s "
              f"(first/later {p['first_over_later']:.2f})")
        print(f"node {p['node_tokens']} tokens, children ~{p['child_tokens_mean']:.0f} tokens")
        for name, table in (("extend", p["extend"]), ("stateless score", p["stateless_score"]),
                            ("HTTP extend", report.get("http", {}).get("extend")),
                            ("HTTP stateless score", report.get("http", {}).get("stateless_score"))):
            if table:
                print(f"  {name:22s}" + "  ".join(f"{n:>2} children {v['median_ms']:7.1f} ms (p90 {v['p90_ms']:.1f})" for n, v in table.items()))
        line = f"beam replay ({p['beam_prompt_tokens']:,} prompt tokens): extend {p['beam_extend_s']:.2f} s, stateless score {p['beam_score_s']:.2f} s"
        if nc:
            line += f", cache off {nc['beam_score_s']:.2f} s ({nc['beam_score_s'] / p['beam_extend_s']:.1f}x)"
        if hf:  # its faster (second) run, the kinder comparison for it
            line += f", transformers {hf['beam_later_s']:.2f} s ({hf['beam_later_s'] / p['beam_extend_s']:.1f}x)"
        print(line)
        if peak:
            flops = 2 * report["matmul_params"] * p["beam_prompt_tokens"]
            print(f"beam replay through extend: {flops / p['beam_extend_s'] / peak:.2f} of the FLOP limit (all prompt tokens)")
            for how in ("extend", "score"):
                computed = p.get(f"beam_{how}_computed_tokens")
                if computed:  # the tokens the cache could not spare: no engine can beat 2 x params x these at peak
                    floor = 2 * report["matmul_params"] * computed / peak
                    best = "".join(f", {name} / floor {other / floor:.1f}x" for name, other in
                                   (("cache off", nc.get("beam_score_s")), ("transformers", hf.get("beam_later_s"))) if other)
                    print(f"  via {how}: {computed:,} tokens computed, floor {floor:.2f} s at peak, "
                          f"{floor / p[f'beam_{how}_s']:.2f} of it reached{best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-math-prm-7b")
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/prmserve-bench-ckpt"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", default="prmserve,no_cache,transformers", help=f"of {', '.join(PHASES)}")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # run one phase in this process
    parser.add_argument("--cold", type=int, default=512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-deterministic", action="store_true", help="prmserve without batch-invariant matmuls")
    parser.add_argument("--attention-backend", default="auto", help="prmserve's attention kernel (TRITON_ATTN, FLASH_ATTN, ...)")
    args = parser.parse_args()
    args.engine_options = ({"device": args.device} if args.device else {}) | ({"deterministic": False} if args.no_deterministic else {}) \
        | {"attention_backend": args.attention_backend}

    if args.phase:
        result = PHASES[args.phase](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    args.checkpoint = args.checkpoint.with_name(f"{args.checkpoint.name}-{args.shape}")
    started = time.perf_counter()
    make_checkpoint(args.shape, args.assets, args.checkpoint)
    report: dict = {"shape": args.shape, "cold_items": args.cold, "checkpoint_s": time.perf_counter() - started,
                    "deterministic": not args.no_deterministic, "attention_backend": args.attention_backend}
    dims = SHAPES[args.shape]
    h, i, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    report["matmul_params"] = layers * (2 * h * h + 2 * kv * h + 3 * h * i) + h * h + 2 * h
    try:
        import torch

        if torch.cuda.is_available():
            from bench_engine import matmul_peak

            report["device"] = torch.cuda.get_device_name()
            report["matmul_peak_flops"] = matmul_peak()
            torch.cuda.empty_cache()
    except ImportError:
        pass
    for name in args.phases.split(","):
        command = [sys.executable, __file__, "--phase", name, "--shape", args.shape, "--assets", str(args.assets),
                   "--checkpoint", str(args.checkpoint), "--out", str(args.out), "--cold", str(args.cold),
                   "--reps", str(args.reps)] + (["--device", args.device] if args.device else []) + \
                  (["--no-deterministic"] if args.no_deterministic else []) + ["--attention-backend", args.attention_backend]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"phase {name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}", flush=True)
            report[name] = {"error": done.stderr[-2000:]}
            continue
        report[name] = json.loads(lines[-1][len("RESULT "):]) | {"process_s": time.perf_counter() - started}
        print(f"phase {name}: {report[name]['process_s']:.0f} s", flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    args.out.write_text(json.dumps(report, indent=1))
    summarize(report)


if __name__ == "__main__":
    main()
