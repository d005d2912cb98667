"""Outcome reward models: one score for the whole solution, read at its last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prmserve.errors import FormatError
from prmserve.formats.base import EncodedItem, PRMFormat, chat_messages, render_chat
from prmserve.formats.qwen_prm import QWEN_SYSTEM_PROMPT
from prmserve.models.heads import HeadSpec


class OutcomeFormat(PRMFormat):
    """Qwen2ForRewardModel (score MLP) and *ForSequenceClassification (score linear), one label.

    The solution is the steps joined by `step_separator`; `step_rewards` holds the one score.
    """

    name = "outcome"
    extendable = False  # one score for the whole solution: there is no node reward to keep
    option_defaults = {"system_prompt": "auto", "step_separator": "\n\n"}

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        if (config.num_labels or 1) != 1:
            raise FormatError(f"the outcome format reads one label; this model has {config.num_labels}")
        self.is_qwen_rm = "Qwen2ForRewardModel" in config.architectures
        if self.options["system_prompt"] == "auto":
            # Qwen2.5-Math-RM's card renders its system prompt; sequence classifiers have none.
            self.options["system_prompt"] = QWEN_SYSTEM_PROMPT if self.is_qwen_rm else None

    @property
    def head(self) -> HeadSpec:
        if self.is_qwen_rm:
            return HeadSpec("mlp", "score", out_features=1)
        return HeadSpec("linear", "score", out_features=1, bias=False)

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        self.check_item(problem, steps)
        solution = self.options["step_separator"].join(steps)
        text = render_chat(self.tokenizer, chat_messages(self.options["system_prompt"], problem, solution))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return EncodedItem(ids, [len(ids) - 1])

    def encode_token_ids(self, token_ids: Sequence[int]) -> EncodedItem:
        ids = list(token_ids)
        return EncodedItem(ids, [len(ids) - 1] if ids else [])

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(head_outputs[:, 0])  # one read position per item
