"""Step-tag LM PRMs (Math-Shepherd, OpenR's Qwen PRM): softmax over the good/bad token logits at each tag."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prmserve.formats.base import EncodedItem, PRMFormat
from prmserve.models.heads import HeadSpec


class MathShepherdFormat(PRMFormat):
    """`problem + " " + "\\n".join(step + " " + tag)`; reward = softmax([good, bad])[0] at each tag.

    A tag ending in a newline is not followed by another "\\n" (it would merge into a longer token).

    OpenR's Qwen PRM: step_tag="\\n\\n\\n\\n\\n", good_token=" +", bad_token=" -".
    """

    name = "math_shepherd"
    option_defaults = {"step_tag": "ки", "good_token": "+", "bad_token": "-"}

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        self.step_tag = self.options["step_tag"]
        # The tag as it appears in the text, after a space (`encode(" \n\n\n\n\n")` in OpenR's code).
        self.read_token_id = tokenizer.encode(" " + self.step_tag, add_special_tokens=False)[-1]
        # A tag that ends a line (OpenR's) is its own line break; others are followed by "\n".
        self.joiner = "" if self.step_tag.endswith("\n") else "\n"
        self.step_forbidden = [self.step_tag]
        self.good_id = self.single_token(self.options["good_token"], "good_token")
        self.bad_id = self.single_token(self.options["bad_token"], "bad_token")

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_rows", rows=(self.good_id, self.bad_id))

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        self.check_item(problem, steps)
        text = f"{problem} " + self.joiner.join(self._segment(step) for step in steps)
        ids = self.tokenizer.encode(text)
        positions = self.expect_count(self.positions_of(ids, self.read_token_id), len(steps), self.step_tag)
        return EncodedItem(ids, positions, positions[-1] + 1)

    def continuation(self, last_step: str, new_steps: Sequence[str]) -> tuple[list[int], list[int]] | None:
        # Tokenised after the last step's own text, so merges at the boundary are seen and refused.
        text = "".join(self.joiner + self._segment(step) for step in new_steps)
        ids = self.ids_after(self._segment(last_step), text)
        offsets = None if ids is None else self.read_offsets(ids, len(new_steps))
        return None if offsets is None else (ids, offsets)

    def _segment(self, step: str) -> str:
        return f"{step} {self.step_tag}"

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.softmax(head_outputs, dim=-1)[:, 0])
