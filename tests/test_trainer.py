"""The bundled model's trainer (scripts/train_small_prm.py): it makes every step's batch, with or without worker
processes (a pool that skipped a chunk trained 3,968 of 4,000 steps and made the data depend on --workers), and
what it saves in bfloat16 is the model it measured."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from prmserve.prm import BUNDLED_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_small_prm


def digest(batch: dict) -> str:
    """The batch's arrays, hashed in key order."""
    h = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        h.update(key.encode() + (value.tobytes() if hasattr(value, "tobytes") else repr(value).encode()))
    return h.hexdigest()


def test_every_chunk_reaches_training_whatever_the_number_of_workers() -> None:
    args = argparse.Namespace(seed=3, steps=3 * train_small_prm.GROUP, batch=2, drill_batch=2, drill_slip_share=0.7,
                              grammar_share=0.5, step_grammar_share=1.0, value_grammar_share=0.0, workers=1, max_minutes=0, start_scale=20,
                              curriculum_share=0.4)
    tokenizer = (BUNDLED_MODEL / "tokenizer.json").read_text()
    pooled = [digest(b) for b in train_small_prm.batches(args, tokenizer, train_small_prm.Clock(args))]
    args.workers = 0
    inline = [digest(b) for b in train_small_prm.batches(args, tokenizer, train_small_prm.Clock(args))]
    assert len(pooled) == len(inline) == args.steps
    assert pooled == inline


def test_a_bfloat16_checkpoint_scores_as_the_rounded_model_it_saved(tmp_path: Path) -> None:
    """--save-dtype bfloat16: the file holds bfloat16 weights, and PRM (float32 on the CPU) gives the rewards the
    trainer's own forward gives with the rounded weights, which is what quality.json measures."""
    import math

    import torch
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import Qwen2Config

    from prmserve import PRM
    from prmserve.bundled import word_problems

    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(BUNDLED_MODEL / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in train_small_prm.SPECIAL_TOKENS}
    vocab = 64 * math.ceil(tok.get_vocab_size() / 64)
    args = argparse.Namespace(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, max_positions=1024,
                              save_dtype="bfloat16")
    model = train_small_prm.SmallPRM(Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="sdpa"))
    before = model.score[0].weight.detach().clone()
    train_small_prm.round_to(model, torch.bfloat16)
    assert not torch.equal(before, model.score[0].weight)  # random float32 weights do not fit bfloat16 exactly
    assert torch.equal(model.score[0].weight, model.score[0].weight.to(torch.bfloat16).float())
    train_small_prm.save_checkpoint(tmp_path, model, tok, train_small_prm.qwen_config(args, vocab, ids), ids)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    pairs = word_problems.generate(4, 5, "validation")
    data = train_small_prm.encode(tok, pairs, ids[train_small_prm.STEP_TOKEN], ids["<|im_start|>"])
    own = train_small_prm.step_rewards(model, data, ids["<|endoftext|>"], train_small_prm.numeric_tokens(tok))
    served = PRM(str(tmp_path), device="cpu").score([{"problem": p.text, "steps": s.steps} for p, s in pairs])
    assert [len(r.step_rewards) for r in served] == [len(r) for r in own]
    for r, o in zip(served, own):
        assert max(abs(a - b) for a, b in zip(r.step_rewards, o)) < 1e-5
