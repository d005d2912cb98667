"""Loading a checkpoint's tokenizer: lengths are the engine's to check (tests/test_bad_inputs.py: 513 tokens refused
where the model takes 512), so the tokenizer does not warn about them."""

from __future__ import annotations

import io
import logging

from prmserve.prm import BUNDLED_MODEL
from prmserve.tokenizer import load_tokenizer


def test_a_long_text_is_tokenised_without_the_tokenizers_length_warning() -> None:
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(BUNDLED_MODEL)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    hf_logging.get_logger().addHandler(handler)  # transformers' root logger, where the warning goes
    try:
        ids = tokenizer("1 + 1 = 2. " * 400)["input_ids"]
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert len(ids) > 2048
    assert "sequence length" not in stream.getvalue()

