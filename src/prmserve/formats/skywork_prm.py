"""Skywork-o1-Open-PRM: lines tokenised one by one, a flagged "\\n" after each, sigmoid(v_head) there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prmserve.formats.base import EncodedItem, PRMFormat
from prmserve.models.heads import HeadSpec


class SkyworkPRMFormat(PRMFormat):
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

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        self.check_item(problem, steps)
        bos = self.tokenizer.bos_token or ""
        ids = list(self.tokenizer.encode(bos + problem + "\n"))
        step_ids, offsets = self._steps(steps)
        return EncodedItem(ids + step_ids, [len(ids) + o for o in offsets], len(ids) + len(step_ids))

    def continuation(
        self, last_step: str, new_steps: Sequence[str], known: Mapping[str, list[int]] | None = None
    ) -> tuple[list[int], list[int]]:
        return self._steps(new_steps)  # every line is tokenised on its own: nothing crosses a boundary

    def _steps(self, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """Each step's ids then the flagged "\n" token; the flag offsets."""
        ids: list[int] = []
        offsets = []
        for step in steps:
            ids += self.tokenizer.encode(step)
            offsets.append(len(ids))
            ids.append(self.step_token_id)
        return ids, offsets

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.sigmoid(head_outputs[:, 0]))
