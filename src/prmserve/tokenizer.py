"""The checkpoint's own tokenizer and chat template, from its directory (no remote code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prmserve.errors import CheckpointError

NO_LENGTH_LIMIT = 10**12  # the tokenizer's model_max_length: lengths are checked by the engine, not by it


def load_tokenizer(directory: Path) -> Any:
    """A fast tokenizer with the chat template from tokenizer_config.json or chat_template.jinja."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load the tokenizer in {directory}: {exc}") from exc
    # prmserve checks input lengths against the model's own limit and names the item; the tokenizer's warning that
    # a long text "will result in indexing errors" would only mislead (nothing that long reaches the model).
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    template_file = Path(directory) / "chat_template.jinja"
    if not getattr(tokenizer, "chat_template", None) and template_file.is_file():
        tokenizer.chat_template = template_file.read_text()
    return tokenizer
