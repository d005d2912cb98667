"""Step-tag LM PRMs (Math-Shepherd, OpenR's Qwen PRM): softmax over the good/bad token logits at each tag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prmserve.errors import FormatError
from prmserve.formats.base import EncodedItem, RenderedFormat
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec

# Each preset is the text its family's reference code builds: f"{problem} " + step_joiner.join(
# f"{step} {step_tag}") + tail, steps stripped first where the reference strips them.
PRESETS: dict[str, dict[str, Any]] = {
    # The math-shepherd-mistral-7b-prm card: f"{question} {output}", output "Step 1: ... ки\nStep 2: ... ки".
    "math_shepherd": {"step_tag": "ки", "step_joiner": "\n", "tail": "", "strip_steps": False, "good_token": "+", "bad_token": "-"},
    # OpenR's Math-psa (reason/inference/rm_call.py, reason/evaluation/evaluate.py, prm/infer_fns.py):
    # f"{question} {answer}", answer = f" {tag}".join(stripped steps) + f" {tag}" with tag "\n\n\n\n\n ",
    # read at encode(" \n\n\n\n\n"), softmax over encode(" + -").
    "openr": {"step_tag": "\n\n\n\n\n", "step_joiner": " ", "tail": " ", "strip_steps": True, "good_token": " +", "bad_token": " -"},
}


class MathShepherdFormat(RenderedFormat):
    """`problem + " " + step_joiner.join(step + " " + step_tag) + tail`; reward = softmax([good, bad])[0] at each tag.

    `preset` ("math_shepherd" or "openr") sets the other options; options given beside it override it.
    """

    name = "math_shepherd"
    option_defaults = {"preset": "math_shepherd", **PRESETS["math_shepherd"]}

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        preset = options.get("preset", "math_shepherd")
        if preset not in PRESETS:
            raise FormatError(f"math_shepherd has no preset {preset!r}; presets: {', '.join(PRESETS)}")
        super().__init__(tokenizer, config, **{**PRESETS[preset], **options})
        self.step_tag = self.options["step_tag"]
        self.step_joiner = self.options["step_joiner"]
        self.strip_steps = bool(self.options["strip_steps"])
        # The tag as it appears in the text, after a space (`encode(" \n\n\n\n\n")` in OpenR's code).
        self.read_token_id = tokenizer.encode(" " + self.step_tag, add_special_tokens=False)[-1]
        self.step_forbidden = [self.step_tag]
        self.good_id = self.single_token(self.options["good_token"], "good_token")
        self.bad_id = self.single_token(self.options["bad_token"], "bad_token")
        self._check_layout()

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_rows", rows=(self.good_id, self.bad_id))

    def render(self, problem: str, steps: Sequence[str]) -> str:
        self.check_item(problem, steps)
        return f"{problem} " + self.step_joiner.join(self._segment(step) for step in steps) + self.options["tail"]

    def from_ids(self, ids: list[int], steps: Sequence[str]) -> EncodedItem:
        positions = self.expect_count(self.positions_of(ids, self.read_token_id), len(steps), self.step_tag)
        return EncodedItem(ids, positions, positions[-1] + 1)

    def boundary(self, last_step: str, new_steps: Sequence[str]) -> tuple[str, str]:
        # Tokenised after the last step's own text, so merges at the boundary are seen and refused.
        return self._segment(last_step), "".join(self.step_joiner + self._segment(step) for step in new_steps)

    def _segment(self, step: str) -> str:
        return f"{step.strip() if self.strip_steps else step} {self.step_tag}"

    def _check_layout(self) -> None:
        """Refuse options whose joiner merges into the tag (e.g. OpenR's tag with a newline joiner)."""
        probe = ["Step 1: 1 + 1 = 2.", "Step 2: 2 + 2 = 4."]
        text = "Problem. " + self.step_joiner.join(self._segment(step) for step in probe) + self.options["tail"]
        found = self.positions_of(self.tokenizer.encode(text), self.read_token_id)
        if len(found) != len(probe):
            raise FormatError(
                f"math_shepherd: step_tag {self.step_tag!r} with step_joiner {self.step_joiner!r} and tail "
                f"{self.options['tail']!r} does not tokenise to one tag per step in this tokenizer "
                f"(OpenR's Qwen PRM is preset='openr')"
            )

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.softmax(head_outputs, dim=-1)[:, 0])
