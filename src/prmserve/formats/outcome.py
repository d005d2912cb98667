"""Outcome reward models: one score for the whole solution, read at its last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prmserve.errors import FormatError
from prmserve.formats.base import EncodedItem, RenderedFormat, chat_messages, render_chat
from prmserve.formats.qwen_prm import QWEN_SYSTEM_PROMPT
from prmserve.models.heads import HeadSpec


class OutcomeFormat(RenderedFormat):
    """Qwen2ForRewardModel (score MLP), *ForSequenceClassification (score linear) and InternLM2ForRewardModel
    (v_head, read at the reward token its card appends), one label.

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
        self.is_internlm2 = "InternLM2ForRewardModel" in config.architectures
        self.reward_token_id = config.raw.get("reward_token_id") if self.is_internlm2 else None
        # InternLM2's card encodes the rendered chat with the tokenizer's special tokens and appends its reward token.
        self.add_special_tokens = self.is_internlm2
        if self.is_internlm2 and not isinstance(self.reward_token_id, int):
            raise FormatError("InternLM2ForRewardModel's config.json has no integer 'reward_token_id' to read the score at")
        if self.options["system_prompt"] == "auto":
            # Qwen2.5-Math-RM's card renders its system prompt; sequence classifiers have none.
            self.options["system_prompt"] = QWEN_SYSTEM_PROMPT if self.is_qwen_rm else None

    @property
    def head(self) -> HeadSpec:
        if self.is_qwen_rm:
            return HeadSpec("mlp", "score", out_features=1)
        return HeadSpec("linear", "v_head" if self.is_internlm2 else "score", out_features=1, bias=False)

    def render(self, problem: str, steps: Sequence[str]) -> str:
        self.check_item(problem, steps)
        solution = self.options["step_separator"].join(steps)
        return render_chat(self.tokenizer, chat_messages(self.options["system_prompt"], problem, solution))

    def from_ids(self, ids: list[int], steps: Sequence[str]) -> EncodedItem:
        if self.is_internlm2:
            ids.append(self.reward_token_id)
        return EncodedItem(ids, [len(ids) - 1])

    def encode_token_ids(self, token_ids: Sequence[int]) -> EncodedItem:
        ids = list(token_ids)
        if self.is_internlm2 and ids and ids[-1] != self.reward_token_id:
            ids.append(self.reward_token_id)
        return EncodedItem(ids, [len(ids) - 1] if ids else [])

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(head_outputs[:, 0])  # one read position per item
