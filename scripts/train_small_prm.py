"""Train the small PRM bundled with prmserve, in the Qwen2.5-Math-PRM checkpoint layout.

The model judges steps of synthetic arithmetic word problems (see ``prmserve.synthetic``).
It is a tiny Qwen2 decoder plus the Qwen2.5-Math-PRM head (Linear(H,H), ReLU, Linear(H,2));
step k's reward is softmax(head logits at the k-th ``<extra_0>``)[1]. Training uses
cross-entropy on those logits plus two auxiliaries: a next-token loss on the correct steps
(its LM head is dropped at save time) and the score head at every assistant token ("the
text so far is still correct"). Each step also trains on 64 arithmetic drills
(``synthetic.make_chain``: a problem's bare claims, some slipped or wrongly carried), which
teach the checks far more cheaply than whole solutions do.

Reproducible: fixed seeds, CPU, 2 threads. Usage::

    python scripts/train_small_prm.py            # writes src/prmserve/bundled/small-prm/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import Qwen2Config, Qwen2Model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from prmserve import quality, synthetic  # noqa: E402
from prmserve.evaluation import accuracy_by_kind, held_out_quality  # noqa: E402

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_TOKEN = "<extra_0>"
QWEN2_PRETOKENIZE_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", STEP_TOKEN,
]
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'Please reason step by step, and put your final answer within \\\\boxed{}.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within "
    "\\\\boxed{}.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def render(problem: str, steps: list[str]) -> str:
    """The chat-template text of one scored solution (same string as apply_chat_template; checked at save)."""
    answer = STEP_TOKEN.join(steps) + STEP_TOKEN
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on synthetic text; specials appended in Qwen order."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_RE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


class SmallPRM(nn.Module):
    """Qwen2 decoder + Qwen2.5-Math-PRM score head; ``lm_head`` is a training-only auxiliary."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        h = config.hidden_size
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (causal; right padding needs no mask)."""
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the token that holds character ``char`` (the first token ending past it)."""
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


def encode(tok: Tokenizer, pairs: list[tuple], step_id: int, im_start_id: int) -> list[dict]:
    """Token ids, ``<extra_0>`` positions and step labels per solution, plus the auxiliary targets.

    ``span`` is the assistant's first and last token; ``wrong`` the first token where the
    solution departs from a correct one (past the span if it never does).
    """
    texts = [render(p.text, s.steps) for p, s in pairs]
    out = []
    for (p, s), text, enc in zip(pairs, texts, tok.encode_batch(texts)):
        ids = enc.ids
        seps = [i for i, t in enumerate(ids) if t == step_id]
        assert len(seps) == len(s.steps)
        first = max(i for i, t in enumerate(ids) if t == im_start_id) + 1
        wrong = seps[-1] + 1
        if s.first_error >= 0:
            char = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n") + s.error_offset
            char += sum(len(step) + len(STEP_TOKEN) for step in s.steps[: s.first_error])
            wrong = token_at(enc.offsets, char)
        out.append({"ids": ids, "seps": seps, "labels": s.labels, "span": (first, seps[-1]), "wrong": wrong})
    return out


def encode_chains(tok: Tokenizer, chains: list[tuple[str, int]]) -> list[dict]:
    """Arithmetic drills (``synthetic.make_chain``) in ``encode``'s item layout, with no steps.

    Each chain is one short sequence led by a space, tokenised as it is inside a step; every
    token is an auxiliary target, up to the first wrong one for the next-token loss.
    """
    out = []
    for (text, wrong_char), enc in zip(chains, tok.encode_batch([" " + t for t, _ in chains])):
        ids = enc.ids
        wrong = len(ids) if wrong_char < 0 else token_at(enc.offsets, wrong_char + 1)  # +1: the leading space
        out.append({"ids": ids, "seps": [], "labels": [], "span": (0, len(ids) - 1), "wrong": wrong})
    return out


def length_grouped(items: list[dict], batch: int, rng: random.Random) -> list[list[dict]]:
    """``items`` cut into batches of similar length (less padding), the batches in random order."""
    items = sorted(items, key=lambda it: len(it["ids"]))
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    rng.shuffle(batches)
    return batches


def collate(items: list[dict], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded batch: ids, flat (row, pos, label) step targets, and per-token auxiliary targets.

    ``lm_mask`` marks tokens to predict (the assistant's text up to the first wrong token);
    ``tok_mask``/``tok_labels`` mark assistant tokens and whether the text so far is still correct.
    """
    n = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    lm_mask = torch.zeros((len(items), n), dtype=torch.bool)
    tok_mask = torch.zeros((len(items), n), dtype=torch.bool)
    tok_labels = torch.zeros((len(items), n), dtype=torch.long)
    rows, pos, labels = [], [], []
    for b, it in enumerate(items):
        ids[b, : len(it["ids"])] = torch.tensor(it["ids"])
        lo, hi = it["span"]
        lm_mask[b, lo : min(hi, it["wrong"] - 1) + 1] = True
        tok_mask[b, lo : hi + 1] = True
        tok_labels[b, lo : it["wrong"]] = 1
        rows += [b] * len(it["seps"])
        pos += it["seps"]
        labels += it["labels"]
    return ids, torch.tensor(rows), torch.tensor(pos), torch.tensor(labels), lm_mask, tok_mask, tok_labels


def losses(model: SmallPRM, items: list[dict], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Step-label cross-entropy (zero for drills, which have no steps), next-token loss and per-token loss."""
    ids, rows, pos, labels, lm_mask, tok_mask, tok_labels = (t.to(device) for t in collate(items, pad_id))
    hidden = model(ids)
    prm = F.cross_entropy(model.score(hidden[rows, pos]), labels) if len(rows) else hidden.new_zeros(())
    lm = F.cross_entropy(model.lm_head(hidden[:, :-1][lm_mask[:, 1:]]), ids[:, 1:][lm_mask[:, 1:]])
    tok = F.cross_entropy(model.score(hidden[tok_mask]), tok_labels[tok_mask])
    return prm, lm, tok


@torch.no_grad()
def step_rewards(model: SmallPRM, data: list[dict], pad_id: int, batch: int = 64) -> list[list[float]]:
    """Reward (P(step correct)) of every step of every solution."""
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        chunk = data[i : i + batch]
        ids, rows, pos, *_ = (t.to(model.score[0].weight.device) for t in collate(chunk, pad_id))
        probs = model.score(model(ids)[rows, pos]).softmax(-1)[:, 1].tolist()
        k = 0
        for it in chunk:
            out.append(probs[k : k + len(it["seps"])])
            k += len(it["seps"])
    model.train()
    return out


def qwen_config(args: argparse.Namespace, vocab_size: int, ids: dict[str, int]) -> dict:
    """config.json in the Qwen2.5-Math-PRM-7B layout."""
    return {
        "architectures": ["Qwen2ForProcessRewardModel"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": args.max_positions,
        "max_window_layers": args.layers,
        "model_type": "qwen2",
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "num_labels": 2,
        "pad_token_id": ids["<|endoftext|>"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": args.max_positions,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def save_checkpoint(out: Path, model: SmallPRM, tok: Tokenizer, config: dict, ids: dict[str, int]) -> None:
    """Write weights, config and tokenizer files in the Qwen2.5-Math-PRM layout."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    extra = ["<|im_start|>", "<|im_end|>"] + SPECIAL_TOKENS[3:]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": extra, "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": config["max_position_embeddings"], "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": extra, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    }, indent=2) + "\n")


def check_chat_template(out: Path, pairs: list[tuple]) -> None:
    """Assert that transformers' tokenizer on the saved files reproduces the training-time encoding."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert len(hf.encode(STEP_TOKEN)) == 1
    for p, s in pairs:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": p.text},
            {"role": "assistant", "content": STEP_TOKEN.join(s.steps) + STEP_TOKEN},
        ]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert text == render(p.text, s.steps), (text, render(p.text, s.steps))
        assert hf.encode(text) == fast.encode(text).ids


def evaluate(model: SmallPRM, tok: Tokenizer, pad_id: int, step_id: int, im_start_id: int, seed: int) -> dict:
    """Held-out quality on the splits ``prmserve evaluate`` uses (``prmserve.evaluation``)."""
    return held_out_quality(lambda pairs: step_rewards(model, encode(tok, pairs, step_id, im_start_id), pad_id), seed)


def write_demo_problems(path: Path, seed: int, n: int = 6) -> None:
    """Bundle ``n`` held-out problems with 4 candidates each, mixing correct and wrong ones, for the demo."""
    rows = []
    for p, sols in synthetic.generate_candidates(10 * n, seed):
        n_ok = sum(s.first_error < 0 for s in sols)
        if 1 <= n_ok <= 2 and len(rows) < n:
            rows.append({"problem": p.text, "solutions": [s.steps for s in sols], "answer": p.answer})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def parse_args() -> argparse.Namespace:
    """Command-line options; defaults are the shipped model's settings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src/prmserve/bundled/small-prm")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train-size", type=int, default=40000)
    ap.add_argument("--steps", type=int, default=1850)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--token-weight", type=float, default=0.5, help="weight of the per-token 'still correct' loss")
    ap.add_argument("--drill-batch", type=int, default=64, help="arithmetic drills per step (synthetic.make_chain)")
    ap.add_argument("--drill-slip-share", type=float, default=0.5, help="share of slips among the drills' errors")
    ap.add_argument("--drill-weight", type=float, default=1.0, help="weight of the drills' next-token and per-token losses")
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=0, help="print validation F1 every N steps (0: never)")
    ap.add_argument("--device", default="cpu", help="cpu for the shipped run; cuda only to explore settings")
    return ap.parse_args()


def main() -> None:
    """Generate data, train tokenizer and model, evaluate, save checkpoint and quality.json."""
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(2)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    train = synthetic.generate(args.train_size, args.seed)
    tok = train_tokenizer([render(p.text, s.steps) for p, s in train[:5000]], args.vocab)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = 64 * math.ceil(tok.get_vocab_size() / 64)
    pad_id, step_id, im_start_id = ids["<|endoftext|>"], ids[STEP_TOKEN], ids["<|im_start|>"]
    data = encode(tok, train, step_id, im_start_id)
    lengths = [len(d["ids"]) for d in data]
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train seq len mean {np.mean(lengths):.0f} max {max(lengths)}")

    config = qwen_config(args, vocab_size, ids)
    hf_config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = SmallPRM(hf_config).to(args.device)
    n_params = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("lm_head."))
    print(f"model: {n_params:,} params ({4 * n_params / 1e6:.2f} MB float32)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    monitor = synthetic.generate(600, args.seed + 1)
    monitor_data, monitor_errors = encode(tok, monitor, step_id, im_start_id), [s.first_error for _, s in monitor]
    drill_rng, group_rng = random.Random(args.seed + 5), random.Random(args.seed + 6)
    order = np.random.default_rng(args.seed).permutation(len(data) * (1 + args.steps * args.batch // len(data)))
    group = 32  # steps whose batches are cut from one length-sorted pool
    batches: list[list[dict]] = []
    drills: list[list[dict]] = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        if not batches:
            batches = length_grouped([data[i % len(data)] for i in order[step * args.batch : (step + group) * args.batch]],
                                     args.batch, group_rng)
        if args.drill_batch and not drills:
            chains = [synthetic.make_chain(drill_rng, p_slip=args.drill_slip_share) for _ in range(group * args.drill_batch)]
            drills = length_grouped(encode_chains(tok, chains), args.drill_batch, group_rng)
        prm_loss, lm_loss, tok_loss = losses(model, batches.pop(), pad_id, args.device)
        loss = prm_loss + args.lm_weight * lm_loss + args.token_weight * tok_loss
        drill_loss = torch.zeros(())
        if args.drill_batch:
            drill_loss = sum(losses(model, drills.pop(), pad_id, args.device)[1:])
            loss = loss + args.drill_weight * drill_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.time() - t0
            eta = (time.time() - t_train) / (step + 1) * (args.steps - step - 1)
            print(f"step {step:5d}  prm {prm_loss.item():.4f}  lm {lm_loss.item():.4f}  tok {tok_loss.item():.4f}  "
                  f"drill {drill_loss.item():.4f}  {elapsed:.0f}s, about {eta:.0f}s of training left", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            r = step_rewards(model, monitor_data, pad_id)
            threshold = quality.best_threshold(r, monitor_errors)
            pb = {**quality.processbench_scores(r, monitor_errors, threshold), **accuracy_by_kind(r, monitor, threshold)}
            print(f"step {step + 1:5d}  validation " + " ".join(f"{k} {v:.3f}" for k, v in pb.items()), flush=True)

    model.cpu()
    save_checkpoint(args.out, model, tok, config, ids)
    check_chat_template(args.out, train[:20])
    metrics = evaluate(model, tok, pad_id, step_id, im_start_id, args.seed)
    metrics["model"] = {"params": n_params, "safetensors_bytes": (args.out / "model.safetensors").stat().st_size}
    metrics["training"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    write_demo_problems(args.out.parent / "demo_problems.jsonl", args.seed + 4)
    (args.out / "quality.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
