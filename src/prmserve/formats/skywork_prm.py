"""Skywork-o1-Open-PRM: lines tokenised one by one, a flagged "\\n" after each, sigmoid(v_head) there."""

from __future__ import annotations

import torch

from prmserve.formats.base import PiecewiseFormat
from prmserve.models.heads import HeadSpec


class SkyworkPRMFormat(PiecewiseFormat):
    """Skywork-o1-Open-PRM-Qwen-2.5-1.5B/7B: one step per line of the response."""

    name = "skywork_prm"

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        # Skywork appends the lone "\n" token after every line; never merged into "\n\n".
        self.step_token_id = tokenizer.encode("\n")[-1]
        self.step_forbidden = ["\n"]

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("linear", "v_head.summary", out_features=1, bias=True)

    def problem_text(self, problem: str) -> str:
        return (self.tokenizer.bos_token or "") + problem + "\n"

    def close_step(self, ids: list[int]) -> tuple[list[int], int]:
        return ids + [self.step_token_id], len(ids)

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.sigmoid(head_outputs[:, 0]))
