"""What every PRM format does: (problem, steps) -> token ids + positions to read; head outputs -> rewards."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prmserve.errors import FormatError, InvalidInputError
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec


@dataclass(frozen=True)
class EncodedItem:
    """An item ready for the engine: its token ids and the positions whose head outputs give rewards."""

    token_ids: list[int]
    read_positions: list[int]


class PRMFormat(ABC):
    """One PRM family's input layout and scoring rule, exactly as its reference code has them."""

    name: ClassVar[str]
    # Option name -> default; only these keyword options are accepted.
    option_defaults: ClassVar[dict[str, Any]] = {}
    # Formats that read a reward at every occurrence of one token (a separator or step tag) set it.
    read_token_id: int | None = None

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(self.option_defaults) or "none"
            raise FormatError(f"format {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        self.tokenizer = tokenizer
        self.config = config
        self.options = {**self.option_defaults, **options}
        # Chat/control tokens: text containing one would change the input's structure.
        self.special_tokens = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]

    @property
    @abstractmethod
    def head(self) -> HeadSpec:
        """The head this format reads (built and filled by the model loader)."""

    @abstractmethod
    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        """Token ids of the model's input for these steps, and one read position per step."""

    def encode_text(self, text: str) -> EncodedItem:
        """A pre-formatted input string (separators already in place), as users of other engines send it."""
        return self.encode_token_ids(self.tokenizer.encode(text))

    def encode_token_ids(self, token_ids: Sequence[int]) -> EncodedItem:
        """Pre-tokenised input; the read positions are found from the separator tokens."""
        if self.read_token_id is None:
            raise FormatError(f"format {self.name!r} needs problem and steps: it cannot find steps in raw text or ids")
        ids = list(token_ids)
        return EncodedItem(ids, self.positions_of(ids, self.read_token_id))

    @abstractmethod
    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        """Step rewards from the head outputs [steps, width] (in the model's dtype) at the read positions."""

    # Shared checks ---------------------------------------------------------------------------

    def check_item(self, problem: Any, steps: Any, forbidden: Sequence[str] = ()) -> None:
        """Refuse what would score wrongly: no steps, non-strings, empty steps, separator text inside."""
        if not isinstance(problem, str) or not problem.strip():
            raise InvalidInputError("'problem' must be a non-empty string")
        if isinstance(steps, str) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise InvalidInputError("'steps' must be a non-empty list of strings")
        for token in self.special_tokens:
            if token in problem:
                raise InvalidInputError(f"the problem contains the special token {token!r}, which would change the input's structure")
        for i, step in enumerate(steps):
            if not isinstance(step, str):
                raise InvalidInputError(f"step {i} is a {type(step).__name__}, not a string")
            if not step.strip():
                raise InvalidInputError(f"step {i} is empty")
            for token in self.special_tokens:
                if token in step:
                    raise InvalidInputError(f"step {i} contains the special token {token!r}, which would change the input's structure")
            for text in forbidden:
                if text and text in step:
                    raise InvalidInputError(
                        f"step {i} contains {text!r}, the {self.name} separator: it would create a phantom step"
                    )

    def single_token(self, text: str, what: str) -> int:
        """The id of text that must tokenise to exactly one token (a separator, a label token)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise FormatError(f"{what} {text!r} is {len(ids)} tokens in this tokenizer; it must be exactly one")
        return ids[0]

    @staticmethod
    def positions_of(token_ids: Sequence[int], token_id: int) -> list[int]:
        """Every position holding token_id."""
        return [i for i, t in enumerate(token_ids) if t == token_id]

    def expect_count(self, positions: list[int], steps: int, separator: str) -> list[int]:
        """The tokenizer must leave exactly one separator per step, or rewards would be misassigned."""
        if len(positions) != steps:
            raise InvalidInputError(
                f"{self.name}: found {len(positions)} {separator!r} separators for {steps} steps after tokenisation "
                "(a step or the problem merges with or contains the separator)"
            )
        return positions

    def to_floats(self, values: torch.Tensor) -> list[float]:
        """Python floats of a tensor whatever its dtype (bf16 values are exact in float)."""
        return [float(x) for x in values.float().tolist()]


def chat_messages(system_prompt: str | None, user: str, assistant: str) -> list[dict[str, str]]:
    """A system (optional), user, assistant conversation in the chat-template message format."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render with the checkpoint's own chat template, as the model cards do."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError("this checkpoint's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
