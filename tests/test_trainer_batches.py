"""The bundled model's trainer (scripts/train_small_prm.py) makes every step's batch, with or without worker
processes: a pool that skipped a chunk trained 3,968 of 4,000 steps and made the data depend on --workers."""

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
                              grammar_share=0.5, step_grammar_share=1.0, workers=1, max_minutes=0, start_scale=20,
                              curriculum_share=0.4)
    tokenizer = (BUNDLED_MODEL / "tokenizer.json").read_text()
    pooled = [digest(b) for b in train_small_prm.batches(args, tokenizer, train_small_prm.Clock(args))]
    args.workers = 0
    inline = [digest(b) for b in train_small_prm.batches(args, tokenizer, train_small_prm.Clock(args))]
    assert len(pooled) == len(inline) == args.steps
    assert pooled == inline
