"""Qwen2.5-Math-PRM family: ChatML conversation, `<extra_0>` after every step, softmax(logits)[1] there."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prmserve.formats.base import EncodedItem, RenderedFormat, chat_messages, render_chat
from prmserve.models.heads import HeadSpec

QWEN_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SEPARATOR = "<extra_0>"


class QwenPRMFormat(RenderedFormat):
    """Qwen2.5-Math-PRM-7B/72B, Qwen2.5-Math-7B-PRM800K; ReasonFlux-PRM-7B with system_prompt=None."""

    name = "qwen_prm"
    option_defaults = {"system_prompt": QWEN_SYSTEM_PROMPT}

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        self.read_token_id = self.single_token(SEPARATOR, "separator")
        self.step_forbidden = [SEPARATOR]

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("mlp", "score", out_features=self.config.num_labels or 2)

    def render(self, problem: str, steps: Sequence[str]) -> str:
        self.check_item(problem, steps)
        answer = SEPARATOR.join(steps) + SEPARATOR
        return render_chat(self.tokenizer, chat_messages(self.options["system_prompt"], problem, answer))

    def from_ids(self, ids: list[int], steps: Sequence[str]) -> EncodedItem:
        positions = self.expect_count(self.positions_of(ids, self.read_token_id), len(steps), SEPARATOR)
        return EncodedItem(ids, positions, positions[-1] + 1)

    def boundary(self, last_step: str, new_steps: Sequence[str]) -> tuple[str, str]:
        # The separator is a special token: text after it is tokenised apart from what precedes it.
        return SEPARATOR, SEPARATOR.join(new_steps) + SEPARATOR

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.softmax(head_outputs, dim=-1)[:, 1])
