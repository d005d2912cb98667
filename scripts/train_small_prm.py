"""Train the small PRM bundled with prmserve, in the Qwen2.5-Math-PRM checkpoint layout.

The model judges steps of synthetic arithmetic word problems (``prmserve.bundled.word_problems``: the train split;
the test split's templates, names, items and number bands are never generated here). It is a tiny Qwen2
decoder plus the Qwen2.5-Math-PRM head (Linear(H,H), ReLU, Linear(H,2)); step k's reward is
softmax(head logits at the k-th ``<extra_0>``)[1]. Training uses cross-entropy on those logits plus two
auxiliaries: a next-token loss on the digits and operators of the correct text (its LM head is dropped at
save time) and the score head at every assistant token ("the text so far is still correct"). Each step
also trains on arithmetic drills (``word_problems.make_drill``: a problem's bare claims, some slipped or
wrongly carried), which teach the checks far more cheaply than whole solutions do. A curriculum grows
the given numbers from ``--start-scale`` to 1,000 over the first ``--curriculum-share`` of the steps.

Worker processes make the batches ahead, each chunk of ``GROUP`` steps from its own seed, so the data
are the same whatever the number of workers. Fixed seeds; GPU and CPU numerics differ, so a CPU run is
another sample of the same recipe, not a bit-copy. The defaults are the shipped checkpoint's recipe (seed 1234,
4,000 steps, every training claim step worded by ``word_problems.step_grammar``); it was trained before the fix
that stopped the worker pool from skipping one chunk (3,968 steps trained; bench/notes/small_prm.md). Usage::

    python scripts/train_small_prm.py                # on one GPU (bf16 autocast); writes src/prmserve/bundled/small-prm/
    python scripts/train_small_prm.py --device cpu   # the same recipe on the CPU, in float32 (hours)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import Qwen2Config, Qwen2Model

try:  # SmallPRM.forward hands Qwen2Model a ready per-layer-type mask mapping, which needs masking_utils (4.53+)
    import transformers.masking_utils  # noqa: F401
except ImportError:
    sys.exit("scripts/train_small_prm.py needs transformers 4.53 or newer (constraints.txt pins the tested one); "
             "prmserve itself runs with 4.46+")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from prmserve.bundled import word_problems  # noqa: E402
from prmserve.evaluation import metrics  # noqa: E402
from prmserve.evaluation.synthetic_task import accuracy_by_kind  # noqa: E402
from prmserve.evaluation.word_problem_task import held_out_quality  # noqa: E402
from prmserve.bundled.word_problems import numbers  # noqa: E402
from prmserve.bundled.word_problems.grammar import GRAMMAR_SHARE  # noqa: E402
from prmserve.bundled.word_problems.step_grammar import STEP_GRAMMAR_SHARE  # noqa: E402

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
GROUP = 32  # steps whose batches are cut from one length-sorted pool (less padding); one worker's chunk
CPU_ROWS = 32  # rows of a batch a forward takes at a time on the CPU (``losses``)
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
    """Byte-level BPE with Qwen2's pre-tokenizer (digits one by one), trained on synthetic text; specials appended in Qwen order."""
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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states, causal; right padding needs no mask.

        ``positions`` (a row holding several sequences, ``collate``'s packed drills): each token's position in
        its own sequence, which starts where it is 0; attention then stays inside each sequence, so every one is
        computed as if alone. The masks go in as the prepared per-layer-type mapping, which skips transformers'
        own mask building (its check for packed rows would wait on the GPU every forward).
        """
        mask = None
        if positions is not None:
            seq = (positions == 0).cumsum(-1)
            n = input_ids.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]
        return self.model(input_ids=input_ids, attention_mask={"full_attention": mask}, position_ids=positions,
                          use_cache=False).last_hidden_state


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


def encode_drills(tok: Tokenizer, drills: list[tuple[str, int]]) -> list[dict]:
    """Arithmetic drills (``word_problems.make_drill``) in ``encode``'s item layout, with no steps.

    Each drill is one short sequence led by a space, tokenised as it is inside a step; every
    token is an auxiliary target, up to the first wrong one for the next-token loss.
    """
    out = []
    for (text, wrong_char), enc in zip(drills, tok.encode_batch([" " + t for t, _ in drills])):
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


def numeric_tokens(tok: Tokenizer) -> np.ndarray:
    """Which token ids are a digit or an operator (a leading space allowed): what the next-token loss predicts."""
    numeric = np.zeros(tok.get_vocab_size(), dtype=bool)
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i]).strip()
        numeric[i] = text != "" and all(c in "0123456789+-=×÷*/−" for c in text)
    return numeric


def targets(item: dict, numeric: np.ndarray) -> tuple[np.ndarray, ...]:
    """One item's auxiliary targets, as positions in the item.

    Next-token targets: the digits and operators of the assistant's text up to the first wrong token (the
    arithmetic and the values carried, not the wording, much of which is random by design), read at the token
    before. Per-token targets: every assistant token and whether the text so far is still correct.
    """
    ids = np.asarray(item["ids"])
    lo, hi = item["span"]
    nxt = np.arange(max(lo, 1), min(hi, item["wrong"] - 1) + 1)
    nxt = nxt[numeric[ids[nxt]]]
    tok = np.arange(lo, hi + 1)
    return nxt - 1, ids[nxt], tok, (tok < item["wrong"]).astype(np.int64)


def pack(items: list[dict], width: int) -> list[list[dict]]:
    """``items`` laid side by side in rows of ``width`` tokens, longest first, each in the first row it fits."""
    rows: list[list[dict]] = []
    free: list[int] = []
    for it in sorted(items, key=lambda it: -len(it["ids"])):
        n = len(it["ids"])
        r = next((r for r, f in enumerate(free) if f >= n), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(width)
        rows[r].append(it)
        free[r] -= n
    return rows


def collate(items: list[dict], pad_id: int, numeric: np.ndarray, drills: list[dict] = ()) -> dict:
    """One step's batch: right-padded ids, and every target as flat (row, position) indices, so the GPU never
    waits on a mask.

    ``items`` (solutions) take a row each; ``drills``, several times shorter, are packed side by side into
    rows of the same width (``pack``), with ``positions`` restarting at 0 for each (``SmallPRM.forward`` keeps
    their attention apart), so solutions and drills go through one forward. Score-head targets, in this order:
    each ``<extra_0>`` and its label, the solutions' per-token targets, the drills' per-token targets; then
    the next-token targets of the solutions and of the drills (``targets``). ``sizes`` counts these five parts.
    """
    width = max(len(it["ids"]) for it in [*items, *drills])
    rows = [[it] for it in items] + (pack(list(drills), width) if drills else [])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    parts: dict[str, list[tuple[np.ndarray, ...]]] = collections.defaultdict(list)  # part: (rows, positions, labels)
    for b, row in enumerate(rows):
        at, kind = 0, "drill" if b >= len(items) else "solution"
        for it in row:
            n = len(it["ids"])
            ids[b, at : at + n] = it["ids"]
            positions[b, at : at + n] = np.arange(n)
            lm_pos, lm_next, tok_pos, tok_labels = targets(it, numeric)
            for part, pos, labels in (("steps", np.asarray(it["seps"], dtype=np.int64), np.asarray(it["labels"], dtype=np.int64)),
                                      (f"{kind} tokens", tok_pos, tok_labels), (f"{kind} next", lm_pos, lm_next)):
                parts[part].append((np.full(len(pos), b), pos + at, labels))
            at += n
        positions[b, at:] = np.arange(n, n + width - at)  # padding continues the row's last sequence

    def flat(names: tuple[str, ...]) -> list[np.ndarray]:
        found = [t for name in names for t in parts[name]]
        return [np.concatenate([t[i] for t in found]).astype(np.int64) if found else np.zeros(0, np.int64) for i in range(3)]

    score, lm = ("steps", "solution tokens", "drill tokens"), ("solution next", "drill next")
    (score_rows, score_pos, score_labels), (lm_rows, lm_pos, lm_next) = flat(score), flat(lm)
    return {"ids": ids, "positions": positions if drills else None, "score_rows": score_rows, "score_pos": score_pos,
            "score_labels": score_labels, "lm_rows": lm_rows, "lm_pos": lm_pos, "lm_next": lm_next,
            "sizes": tuple(sum(len(t[0]) for t in parts[name]) for name in score + lm)}


def to_device(batch: dict, device: str) -> dict[str, torch.Tensor]:
    """A batch's arrays on ``device``, through one (pinned) copy of them all."""
    names = [k for k, v in batch.items() if isinstance(v, np.ndarray)]
    flat = torch.from_numpy(np.concatenate([batch[k].ravel() for k in names]))
    if device.startswith("cuda"):
        flat = flat.pin_memory().to(device, non_blocking=True)
    out, at = {}, 0
    for k in names:
        out[k] = flat[at : at + batch[k].size].view(batch[k].shape)
        at += batch[k].size
    return out


def per_target_losses(model: SmallPRM, ids: torch.Tensor, positions: torch.Tensor | None, score_rows: torch.Tensor,
                      score_pos: torch.Tensor, score_labels: torch.Tensor, lm_rows: torch.Tensor, lm_pos: torch.Tensor,
                      lm_next: torch.Tensor, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of every score-head target and of every next-token target of a batch, unreduced; the
    forward takes ``rows`` rows at a time (0: all at once)."""
    if rows and len(ids) > rows:
        hidden = torch.cat([model(ids[i : i + rows], None if positions is None else positions[i : i + rows])
                            for i in range(0, len(ids), rows)])
    else:
        hidden = model(ids, positions)
    score = F.cross_entropy(model.score(hidden[score_rows, score_pos]).float(), score_labels, reduction="none")
    lm = F.cross_entropy(model.lm_head(hidden[lm_rows, lm_pos]).float(), lm_next, reduction="none")
    return score, lm


def losses(per_target, model: SmallPRM, batch: dict, device: str) -> tuple[torch.Tensor, ...]:
    """Step-label cross-entropy; next-token and per-token losses of the solutions; of the drills: each the mean
    over its targets (zero where a batch has none). ``per_target`` is ``per_target_losses``, maybe compiled.

    On the GPU the whole batch is one forward (launch-bound); on the CPU, ``CPU_ROWS`` rows at a time, whose
    activations stay in cache (one forward of it all took ~1.3x as long as the two of solutions and drills did).
    """
    t = to_device(batch, device)
    score, lm = per_target(model, t["ids"], t.get("positions"), t["score_rows"], t["score_pos"], t["score_labels"],
                           t["lm_rows"], t["lm_pos"], t["lm_next"], 0 if device.startswith("cuda") else CPU_ROWS)
    n_steps, n_tok, n_drill_tok, n_lm, n_drill_lm = batch["sizes"]
    prm, tok, drill_tok = score.split([n_steps, n_tok, n_drill_tok])
    lm, drill_lm = lm.split([n_lm, n_drill_lm])
    return tuple(x.mean() if x.numel() else x.new_zeros(()) for x in (prm, lm, tok, drill_lm, drill_tok))


@torch.no_grad()
def step_rewards(model: SmallPRM, data: list[dict], pad_id: int, numeric: np.ndarray, autocast: bool = False,
                 batch: int = 128) -> list[list[float]]:
    """Reward (P(step correct)) of every step of every solution."""
    model.eval()
    device = model.score[0].weight.device
    out = []
    for i in range(0, len(data), batch):
        chunk = data[i : i + batch]
        b = collate(chunk, pad_id, numeric)
        n = b["sizes"][0]  # the score-head targets start with every <extra_0>
        ids, rows, pos = (torch.from_numpy(v).to(device) for v in (b["ids"], b["score_rows"][:n], b["score_pos"][:n]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.score(model(ids)[rows, pos])
        probs = logits.float().softmax(-1)[:, 1].tolist()
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
        "torch_dtype": args.save_dtype,
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def round_to(model: SmallPRM, dtype: torch.dtype) -> None:
    """Round the weights in place to what ``dtype`` can hold, so the quality measured after is the saved model's."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def save_checkpoint(out: Path, model: SmallPRM, tok: Tokenizer, config: dict, ids: dict[str, int]) -> None:
    """Write weights (in the config's ``torch_dtype``), config and tokenizer files in the Qwen2.5-Math-PRM layout."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config["torch_dtype"])
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
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


def evaluate(model: SmallPRM, tok: Tokenizer, ids: dict[str, int], numeric: np.ndarray, seed: int) -> dict:
    """Held-out quality on the word problems' test split (``evaluation.word_problem_task``), in float32."""
    pad_id, step_id, im_start_id = ids["<|endoftext|>"], ids[STEP_TOKEN], ids["<|im_start|>"]
    return held_out_quality(lambda pairs: step_rewards(model, encode(tok, pairs, step_id, im_start_id), pad_id, numeric), seed)


class Clock:
    """Training progress in [0, 1]: the share of ``--steps`` done, or of ``--max-minutes`` spent if that is
    larger (a time-bound run still warms up, grows its numbers and anneals its learning rate)."""

    def __init__(self, args: argparse.Namespace):
        self.steps, self.seconds, self.start = args.steps, 60 * args.max_minutes, time.time()

    def at(self, step: int) -> float:
        done = step / self.steps
        if self.seconds:
            done = max(done, (time.time() - self.start) / self.seconds)
        return min(1.0, done)


def scale_at(progress: float, args: argparse.Namespace) -> int:
    """The curriculum: the largest given number at this point of training, growing geometrically to 1,000."""
    if progress >= args.curriculum_share:
        return numbers.MAX_GIVEN
    return round(args.start_scale * (numbers.MAX_GIVEN / args.start_scale) ** (progress / args.curriculum_share))


def lr_factor(progress: float) -> float:
    """Linear warm-up over the first 5% of training, then cosine decay to zero."""
    return min(1.0, progress / 0.05) * 0.5 * (1 + math.cos(math.pi * progress))


def training_pairs(rng: random.Random, n: int, scale: int, grammar_share: float = GRAMMAR_SHARE,
                   step_grammar_share: float = STEP_GRAMMAR_SHARE, value_grammar_share: float = 0.0) -> list[tuple]:
    """``n`` (problem, solution) pairs of the train split, half of them with one error."""
    out = []
    for _ in range(n):
        p = word_problems.make_problem(rng, scale=scale, grammar_share=grammar_share)
        out.append((p, word_problems.make_solution(rng, p, step_grammar_share, value_grammar_share) if rng.random() < 0.5
                    else word_problems.corrupt(rng, p, step_grammar_share=step_grammar_share,
                                               value_grammar_share=value_grammar_share)))
    return out


_WORKER: dict = {}  # each data worker's tokenizer, special ids and numeric-token table


def _init_worker(tokenizer_json: str) -> None:
    # One thread a worker: the workers are the parallelism, and the training process (launch-bound) needs its core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(tokenizer_json)
    _WORKER.update(tok=tok, ids={t: tok.token_to_id(t) for t in SPECIAL_TOKENS}, numeric=numeric_tokens(tok))


def make_chunk(spec: tuple) -> list[dict]:
    """``GROUP`` steps' batches (solutions and drills), collated, drawn from the chunk's own seed."""
    seed, index, scale, batch, drill_batch, p_slip, grammar_share, step_grammar_share, value_grammar_share = spec
    tok, ids, numeric = _WORKER["tok"], _WORKER["ids"], _WORKER["numeric"]
    pad_id = ids["<|endoftext|>"]
    rng = random.Random(f"chunk-{seed}-{index}")
    pairs = training_pairs(rng, GROUP * batch, scale, grammar_share, step_grammar_share, value_grammar_share)
    solutions = length_grouped(encode(tok, pairs, ids[STEP_TOKEN], ids["<|im_start|>"]), batch, rng)
    drills: list[list[dict]] = [[]] * GROUP
    if drill_batch:
        made = [word_problems.make_drill(rng, p_slip=p_slip, scale=scale) for _ in range(GROUP * drill_batch)]
        drills = length_grouped(encode_drills(tok, made), drill_batch, rng)
    return [collate(s, pad_id, numeric, d) for s, d in zip(solutions, drills)]


def batches(args: argparse.Namespace, tokenizer_json: str, clock: Clock) -> Iterator[dict]:
    """Every step's batches in order; ``--workers`` processes make chunks ahead (0: made here, in turn).

    A chunk's numbers follow the curriculum at its first step (or, in a time-bound run, at the time it is asked for).
    """
    specs = ((args.seed, i, scale_at(clock.at(i * GROUP), args), args.batch, args.drill_batch, args.drill_slip_share,
              args.grammar_share, args.step_grammar_share, args.value_grammar_share)
             for i in range(math.ceil(args.steps / GROUP)))
    if args.workers == 0:
        _init_worker(tokenizer_json)
        for spec in specs:
            yield from make_chunk(spec)
        return
    with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (tokenizer_json,)) as pool:
        pending = collections.deque(pool.apply_async(make_chunk, (s,)) for s in itertools.islice(specs, 2 * args.workers))
        while pending:
            chunk = pending.popleft().get()
            spec = next(specs, None)
            if spec is not None:
                pending.append(pool.apply_async(make_chunk, (spec,)))
            yield from chunk


def monitor(model: SmallPRM, sets: dict[str, tuple[list[dict], list]], pad_id: int, numeric: np.ndarray, autocast: bool) -> str:
    """F1 at the threshold chosen on validation, and first errors named by kind, on each monitored set."""
    rewards = {name: step_rewards(model, data, pad_id, numeric, autocast) for name, (data, _) in sets.items()}
    threshold = metrics.best_threshold(rewards["validation"], [s.first_error for _, s in sets["validation"][1]])
    line = [f"threshold {threshold:.2f}"]
    for name, (_, pairs) in sets.items():
        errors = [s.first_error for _, s in pairs]
        pb = {**metrics.processbench_scores(rewards[name], errors, threshold),
              **accuracy_by_kind(rewards[name], pairs, threshold, word_problems.ERROR_KINDS)}
        line.append(f"{name}: " + " ".join(f"{k.removeprefix('acc_')} {v:.2f}" for k, v in pb.items()))
    return " | ".join(line)


def parse_args() -> argparse.Namespace:
    """Command-line options; defaults are the recipe of the last runs in bench/notes/small_prm.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src/prmserve/bundled/small-prm")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128, help="whole solutions per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--token-weight", type=float, default=0.5, help="weight of the per-token 'still correct' loss")
    ap.add_argument("--drill-batch", type=int, default=256, help="arithmetic drills per step (word_problems.make_drill)")
    ap.add_argument("--drill-slip-share", type=float, default=0.7, help="share of slips among the drills' errors")
    ap.add_argument("--drill-weight", type=float, default=1.0, help="weight of the drills' next-token and per-token losses")
    ap.add_argument("--grammar-share", type=float, default=GRAMMAR_SHARE,
                    help="share of training problems worded by word_problems.grammar (the rest: the templates)")
    ap.add_argument("--step-grammar-share", type=float, default=1.0,
                    help="share of training claim steps worded by word_problems.step_grammar (the rest: the templates)")
    ap.add_argument("--value-grammar-share", type=float, default=0.0,
                    help="share of training start, restate and final steps worded by word_problems.step_grammar "
                         "(0, the shipped recipe: the templates and their random frames only)")
    ap.add_argument("--start-scale", type=int, default=20, help="largest given number when the curriculum starts")
    ap.add_argument("--curriculum-share", type=float, default=0.4, help="share of the steps over which given numbers grow to 1,000")
    ap.add_argument("--vocab", type=int, default=900)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=448)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--device", default="cuda", help="cuda (bf16 autocast) for the shipped run; cpu (float32) reproduces it slowly")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step's forward and losses "
                    "(fused kernels; ~200 s of compiling first, so only for long runs: bench/notes/small_prm.md)")
    ap.add_argument("--workers", type=int, default=7, help="processes making batches ahead (0: in the training process)")
    ap.add_argument("--eval-every", type=int, default=0, help="print validation and held-out dev F1 every N steps (0: never)")
    ap.add_argument("--ema", type=float, default=0, help="keep an exponential moving average of the weights with this "
                    "decay (e.g. 0.999) and ship it; quality.json's raw_weights holds the last weights' quality (0: off)")
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="element type of the saved weights (bfloat16, as the real 7B ships, halves the file for a larger "
                    "model); quality.json measures the saved, rounded weights (its raw_weights, with --ema, are not rounded)")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop training early after this long (0: never); quality.json says so")
    return ap.parse_args()


def main() -> None:
    """Generate data, train tokenizer and model, evaluate, save checkpoint and quality.json."""
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    autocast = args.device.startswith("cuda")
    if autocast:
        # cuDNN's attention plans each new batch shape anew (~0.1 s); the shapes change every step here, so the
        # flash and memory-efficient kernels, which need no plan, are the fast ones (same arithmetic).
        torch.backends.cuda.enable_cudnn_sdp(False)

    text_rng = random.Random(args.seed + 7)
    sample = training_pairs(text_rng, 4000, numbers.MAX_GIVEN, args.grammar_share, args.step_grammar_share,
                            args.value_grammar_share)
    drill_texts = [word_problems.make_drill(text_rng)[0] for _ in range(4000)]
    tok = train_tokenizer([render(p.text, s.steps) for p, s in sample] + drill_texts, args.vocab)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = 64 * math.ceil(tok.get_vocab_size() / 64)
    pad_id, step_id, im_start_id = ids["<|endoftext|>"], ids[STEP_TOKEN], ids["<|im_start|>"]
    numeric = numeric_tokens(tok)
    lengths = [len(d["ids"]) for d in encode(tok, sample, step_id, im_start_id)]
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train seq len mean {np.mean(lengths):.0f} max {max(lengths)}", flush=True)

    config = qwen_config(args, vocab_size, ids)
    hf_config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = SmallPRM(hf_config).to(args.device)
    n_params = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("lm_head."))
    save_dtype = getattr(torch, args.save_dtype)
    print(f"model: {n_params:,} params ({torch.finfo(save_dtype).bits // 8 * n_params / 1e6:.2f} MB {args.save_dtype})", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay,
                            fused=autocast)
    # Monitored while training: validation (training's wording) and a dev set worded like the test split
    # (another seed than the test split's, so the reported test numbers stay unseen).
    watched = {"validation": word_problems.generate(400, args.seed + 1, "validation"),
               "held-out dev": word_problems.generate(400, args.seed + 1, "test")}
    watched_data = {name: (encode(tok, pairs, step_id, im_start_id), pairs) for name, pairs in watched.items()}
    model.train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if args.ema else None
    clock, trained, waited, ready = Clock(args), 0, 0.0, time.time()
    per_target = torch.compile(per_target_losses, dynamic=True) if args.compile else per_target_losses
    for step, batch in enumerate(batches(args, tok.to_str(), clock)):
        if step == 0:
            clock.start = time.time()  # time spent training, not starting the workers
        else:
            waited += time.time() - ready  # for the batches (the workers fell behind)
        progress = clock.at(step)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress + 0.5 / args.steps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            prm_loss, lm_loss, tok_loss, drill_lm_loss, drill_tok_loss = losses(per_target, model, batch, args.device)
            drill_loss = drill_lm_loss + drill_tok_loss
            loss = prm_loss + args.lm_weight * lm_loss + args.token_weight * tok_loss + args.drill_weight * drill_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:  # the usual warm-up of the decay, so the first steps' weights fade fast
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - min(args.ema, (1 + step) / (10 + step)))
        trained = step + 1
        if step % 100 == 0:
            print(f"step {step:5d}  progress {progress:.3f}  scale {scale_at(progress, args):4d}  prm {prm_loss.item():.4f}  "
                  f"lm {lm_loss.item():.4f}  tok {tok_loss.item():.4f}  drill {drill_loss.item():.4f}  {time.time() - t0:.0f}s "
                  f"(waited {waited:.0f}s for batches)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            print(f"step {step + 1:5d}  {monitor(model, watched_data, pad_id, numeric, autocast)}  {time.time() - t0:.0f}s", flush=True)
        ready = time.time()

    train_seconds = time.time() - clock.start
    raw_quality = None
    if ema is not None:  # the last weights' quality, for comparison, then the average is what ships
        raw_quality = evaluate(model, tok, ids, numeric, args.seed)
        print("raw weights:", json.dumps(raw_quality), flush=True)
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
    round_to(model, save_dtype)
    save_checkpoint(args.out, model.cpu(), tok, config, ids)
    quality = evaluate(model.to(args.device), tok, ids, numeric, args.seed)
    if raw_quality is not None:
        quality["raw_weights"] = raw_quality
    quality["task"] = "word_problems"  # what `prmserve evaluate` measures this checkpoint on
    quality["model"] = {"params": n_params, "safetensors_bytes": (args.out / "model.safetensors").stat().st_size}
    quality["training"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "workers", "eval_every")}
    quality["training"].update(
        steps_trained=trained, train_seconds=round(train_seconds), seconds_waiting_for_batches=round(waited), total_seconds=round(time.time() - t0),
        device_name=torch.cuda.get_device_name() if autocast else "cpu", torch=torch.__version__,
    )
    (args.out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality, indent=2))
    check_chat_template(args.out, sample[:20])
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
