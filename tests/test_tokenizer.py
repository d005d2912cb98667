"""Loading a checkpoint's tokenizer: lengths are the engine's to check, so the tokenizer does not warn about them."""

from __future__ import annotations

import io
import logging

import pytest

from prmserve import PRM
from prmserve.errors import InputTooLongError
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


def test_the_engine_still_refuses_an_item_longer_than_the_model_takes() -> None:
    prm = PRM(device="cpu", dtype="float32")
    try:
        with pytest.raises(InputTooLongError, match="1024"):
            prm.score([{"problem": "Tom has 3 apples. " * 200, "steps": ["3 + 2 = 5."]}])
    finally:
        prm.close()
