"""How close prmserve's bf16 rewards are to plain transformers run one sequence at a time (the model cards' way).

Compares, on real-length GSM8K inputs and random weights of a real shape: transformers batch 1 (the
reference), transformers padded batch 16 (its own noise floor), prmserve eager, prmserve compiled, and
prmserve compiled with inductor emulating eager's bf16 rounding of intermediates.

    python bench/bf16_agreement.py --shape skywork-o1-prm-1.5b --requests 64
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_engine import HERE, SHAPES, make_head, max_diff, rewards_of, run_transformers
from prmserve.engine import Engine, EngineConfig, EngineLoop
from prmserve.models.config import BackboneConfig
from prmserve.models.loader import StateDictTensors, build_reward_model


def prmserve_rewards(model, fmt: str, items: list) -> list[list[float]]:
    loop = EngineLoop(Engine(model, EngineConfig(enable_prefix_caching=False, num_kv_blocks=4096)))
    futures = [loop.submit(ids, reads) for ids, reads in items]
    out = [rewards_of(fmt, f.result().outputs).float().tolist() for f in futures]
    loop.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    from transformers import Qwen2Config, Qwen2Model

    shape = dict(SHAPES[args.shape])
    fmt = shape.pop("format")
    items = json.loads((HERE / ".assets" / f"workloads_{fmt}.json").read_text())["cold"][0][: args.requests]
    torch.manual_seed(0)
    with torch.device("cuda"):
        backbone = Qwen2Model(Qwen2Config(**shape, attn_implementation="sdpa")).to(torch.bfloat16).eval()
        head, spec, head_name = make_head(fmt, shape["hidden_size"])
        head = head.to(torch.bfloat16).eval()
    reference, padded = _all(backbone, head, fmt, items, 1), _all(backbone, head, fmt, items, 16)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"{head_name}.{k}": v for k, v in head.state_dict().items()}
    cfg = BackboneConfig.from_dict({"model_type": "qwen2", **shape, "max_position_embeddings": 32768})
    model = build_reward_model(cfg, spec, StateDictTensors(state), torch.device("cuda"), torch.bfloat16)
    model.set_attention_kernel(True)
    rows = {"transformers padded x16": padded, "prmserve eager": prmserve_rewards(model, fmt, items)}
    model.compile_layers()
    rows["prmserve compiled"] = prmserve_rewards(model, fmt, items)
    torch._inductor.config.emulate_precision_casts = True
    torch._dynamo.reset()
    model.compile_layers()
    rows["prmserve compiled, emulated bf16 casts"] = prmserve_rewards(model, fmt, items)
    for name, values in rows.items():
        flat = [abs(a - b) for x, y in zip(values, reference) for a, b in zip(x, y)]
        print(f"{args.shape} {name:40s} max |diff| {max(flat):.4f}  mean {sum(flat) / len(flat):.5f}  vs transformers batch 1")


def _all(backbone, head, fmt, items, batch):
    """Every item's rewards (run_transformers keeps only the first batch's)."""
    out = []
    for i in range(0, len(items), batch):
        out += run_transformers(backbone, head, fmt, [items[i : i + batch]], batch=batch)[1]
    return out


if __name__ == "__main__":
    main()
