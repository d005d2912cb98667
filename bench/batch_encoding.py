"""Tokenising a call's items one by one (`encode`) against in one batch (`encode_many`), per format, on the real
Qwen2 BPE and GSM8K solutions of `bench/.assets` (CPU only; checks the ids are the same). RLHFlow runs on the
Qwen ChatML template here, not Llama 3.1's: its timing, not its rewards, is what this measures.

    python bench/make_workloads.py && PYTHONPATH=src python bench/batch_encoding.py --items 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from prmserve.formats import make_format
from prmserve.models.config import BackboneConfig
from prmserve.tokenizer import load_tokenizer

HERE = Path(__file__).parent
FORMATS = {"qwen_prm": {}, "skywork_prm": {}, "token_classification": {}, "math_shepherd": {"preset": "openr"}, "rlhflow": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=HERE / ".assets")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(args.assets / "qwen2-tokenizer"))
    config = BackboneConfig.from_dict({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8,
                                       "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    rows = json.loads((args.assets / "gsm8k_solutions.json").read_text())
    # One line per step (Skywork's rule), the same items for every format.
    items = [(r["problem"], [s.replace("\n", " ") for s in r["solutions"][k % 4]]) for k, r in enumerate(rows[: args.items])]
    print(f"{len(items)} items, {sum(len(s) for _, s in items)} steps")
    for name, options in FORMATS.items():
        fmt = make_format(name, tokenizer, config, **options)
        one, many = [], []
        for _ in range(args.reps):  # alternated, so drift in the machine's load hits both
            started = time.perf_counter()
            alone = [fmt.encode(p, s) for p, s in items]
            one.append(time.perf_counter() - started)
            started = time.perf_counter()
            together = fmt.encode_many(items)
            many.append(time.perf_counter() - started)
        assert alone == together, f"{name}: encode_many gave other ids than encode"
        print(f"{name:22s} encode {statistics.median(one) * 1e3:6.1f} ms   encode_many {statistics.median(many) * 1e3:6.1f} ms"
              f"   (median of {args.reps}; same ids)")


if __name__ == "__main__":
    main()
