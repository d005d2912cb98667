"""Host-side cost of the engine alone: the beam-search replay through `EngineLoop` with the model stubbed out.

What is left is scheduling, prefix matching, index building and result hand-off: the work the GPU
waits for between steps. CPU only; needs `python bench/make_workloads.py` first.

    PYTHONPATH=src python bench/host_overhead.py                  # as shipped
    PYTHONPATH=src python bench/host_overhead.py --no-gc-freeze   # without freeze_heap() (gc.freeze), as the CLI calls it
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prmserve.engine import Engine, EngineConfig, EngineLoop
from prmserve.engine.loop import freeze_heap
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.transformer import RewardModel

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=Path, default=HERE / ".assets/workloads_skywork_prm.json")
    parser.add_argument("--no-gc-freeze", action="store_true", help="skip freeze_heap() (gc.freeze), which the CLI runs after loading")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import transformers  # noqa: F401  (a real process has it loaded, and the collector scans it)

    cfg = BackboneConfig.from_dict({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "max_position_embeddings": 32768})
    model = RewardModel(cfg, HeadSpec("linear", source="v_head")).eval().requires_grad_(False)
    engine = Engine(model, EngineConfig(max_num_batched_tokens=16384, num_kv_blocks=100_000))
    engine.runner.model = lambda ids, positions, inputs: torch.zeros((ids.shape[0], 1))  # no compute
    if not args.no_gc_freeze:
        freeze_heap()  # as `prmserve serve` / `score` do once the model is loaded
    loop = EngineLoop(engine)
    text = args.workloads.read_text()
    for _ in range(args.repeats):
        phases = json.loads(text)["beam_search"]  # fresh request data, created while the loop runs
        loop.reset_prefix_cache()
        start = time.perf_counter()
        for phase in phases:
            [f.result() for f in loop.submit_many(phase)]
        print(f"beam-search replay, host side only: {1e3 * (time.perf_counter() - start):.0f} ms "
              f"({sum(len(p) for p in phases)} requests; gc.freeze {'off' if args.no_gc_freeze else 'on'})")
    loop.shutdown()


if __name__ == "__main__":
    main()
