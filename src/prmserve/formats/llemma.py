"""Llemma PRM of the REBASE/ETS tree-search papers: sigmoid of the mean LM logit at each ` ки` tag."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prmserve.formats.base import EncodedItem, RenderedFormat
from prmserve.models.heads import HeadSpec

STEP_TAG = " ки"


class LlemmaFormat(RenderedFormat):
    """`problem + "\\n"` then the steps joined by "\\n", each ending in ` ки`.

    The mean over the vocabulary of W·h is (mean of W's rows)·h, so the head is one precomputed row
    (averaged in float32); the reference averages rounded fp16 logits, so fp16 results differ in rounding.
    """

    name = "llemma"

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        self.read_token_id = tokenizer.encode(STEP_TAG, add_special_tokens=False)[-1]
        self.step_forbidden = [STEP_TAG.strip()]

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_mean")

    def render(self, problem: str, steps: Sequence[str]) -> str:
        self.check_item(problem, steps)
        return problem + "\n" + "\n".join(step + STEP_TAG for step in steps)

    def from_ids(self, ids: list[int], steps: Sequence[str]) -> EncodedItem:
        positions = self.expect_count(self.positions_of(ids, self.read_token_id), len(steps), STEP_TAG)
        return EncodedItem(ids, positions, positions[-1] + 1)

    def boundary(self, last_step: str, new_steps: Sequence[str]) -> tuple[str, str]:
        return last_step + STEP_TAG, "".join("\n" + step + STEP_TAG for step in new_steps)

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.sigmoid(head_outputs[:, 0]))
