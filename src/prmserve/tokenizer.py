"""The checkpoint's own tokenizer and chat template, from its directory (no remote code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prmserve.errors import CheckpointError


def load_tokenizer(directory: Path) -> Any:
    """A fast tokenizer with the chat template from tokenizer_config.json or chat_template.jinja."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load the tokenizer in {directory}: {exc}") from exc
    template_file = Path(directory) / "chat_template.jinja"
    if not getattr(tokenizer, "chat_template", None) and template_file.is_file():
        tokenizer.chat_template = template_file.read_text()
    return tokenizer
