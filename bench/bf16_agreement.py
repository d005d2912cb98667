"""How close prmserve's rewards on the GPU are to plain transformers run one sequence at a time.

On real-length GSM8K inputs and random weights of a real shape: float32 (same function, expect
float32 rounding); then, in bf16, how far transformers (batch 1 and padded 16) and prmserve (eager
and compiled) each land from the float32 answer, in rewards and in hidden states per layer.

    python bench/bf16_agreement.py --shape skywork-o1-prm-1.5b --requests 64
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_engine import HERE, SHAPES, make_head, rewards_of, run_transformers
from prmserve.engine import Engine, EngineConfig, EngineLoop
from prmserve.models.attention import AttentionInputs, choose_backend
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
        backbone = Qwen2Model(Qwen2Config(**shape, attn_implementation="sdpa")).eval()
        head, spec, head_name = make_head(fmt, shape["hidden_size"])
        head = head.eval()
    cfg = BackboneConfig.from_dict({"model_type": "qwen2", **shape, "max_position_embeddings": 32768})

    def ours(dtype: torch.dtype):
        state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
        state |= {f"{head_name}.{k}": v for k, v in head.state_dict().items()}
        model = build_reward_model(cfg, spec, StateDictTensors(state), torch.device("cuda"), dtype)
        model.set_attention_kernel(choose_backend(torch.device("cuda"), dtype, cfg.head_dim))
        return model

    # float32 first: the same function on the GPU, up to float32 rounding (SDPA loop; Flash has no fp32).
    reference32 = _all(backbone, head, fmt, items, 1)
    hidden32 = _hf_hidden(backbone, items[0][0])
    model = ours(torch.float32)
    f32 = [abs(a - b) for x, y in zip(prmserve_rewards(model, fmt, items), reference32) for a, b in zip(x, y)]
    print(f"{args.shape} float32: prmserve vs transformers batch 1, max |diff| {max(f32):.2e}")
    del model
    backbone.to(torch.bfloat16)
    head.to(torch.bfloat16)
    model = ours(torch.bfloat16)
    print("hidden-state error vs float32 after layers 1..L-1 (norm of difference / norm):")
    print("  transformers bf16:", _errors(_hf_hidden(backbone, items[0][0]), hidden32))
    print("  prmserve bf16:    ", _errors(_our_hidden(model, items[0][0]), hidden32))
    rows = {"transformers bf16 batch 1": _all(backbone, head, fmt, items, 1),
            "transformers bf16 padded x16": _all(backbone, head, fmt, items, 16),
            "prmserve bf16 eager": prmserve_rewards(model, fmt, items)}
    model.compile_layers()
    rows["prmserve bf16 compiled"] = prmserve_rewards(model, fmt, items)
    for name, values in rows.items():
        flat = [abs(a - b) for x, y in zip(values, reference32) for a, b in zip(x, y)]
        print(f"{args.shape} {name:30s} reward error vs float32: max {max(flat):.4f}  mean {sum(flat) / len(flat):.5f}")


@torch.inference_mode()
def _hf_hidden(backbone, ids: list[int]) -> list[torch.Tensor]:
    """transformers' hidden states after each layer but the last, as float32."""
    tokens = torch.tensor(ids, device="cuda")
    return [h[0].float() for h in backbone(input_ids=tokens[None], output_hidden_states=True).hidden_states[1:-1]]


@torch.inference_mode()
def _our_hidden(model, ids: list[int]) -> list[torch.Tensor]:
    """prmserve's hidden states after each layer but the last, as float32."""
    tokens = torch.tensor(ids, device="cuda")
    inputs = AttentionInputs.uncached([len(ids)], "cuda")
    x = model.embed_tokens(tokens)
    cos, sin = model.rotary.cos_sin(torch.arange(len(ids), device="cuda"), x.dtype)
    out = []
    for layer in model.layers[:-1]:
        x = layer(x, cos, sin, inputs, None)
        out.append(x.float())
    return out


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> str:
    return " ".join(f"{(g - w).norm().item() / w.norm().item():.1e}" for g, w in zip(got, want))


def _all(backbone, head, fmt, items, batch):
    """Every item's rewards (run_transformers keeps only the first batch's)."""
    out = []
    for i in range(0, len(items), batch):
        out += run_transformers(backbone, head, fmt, [items[i : i + batch]], batch=batch)[1]
    return out


if __name__ == "__main__":
    main()
