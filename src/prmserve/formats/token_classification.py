"""Token-classification PRMs (TRL's PRMTrainer, axolotl): each step's ids then the separator's, 2-label softmax there.

TRL's `PRMTrainer.tokenize_row` builds the input without a chat template: BOS (when the tokenizer has
one), the prompt's ids, then for every step its own ids followed by the separator's ids, each piece
tokenised alone without special tokens; the label sits on the separator's last token.
"""

from __future__ import annotations

from typing import Any

import torch

from prmserve.errors import FormatError
from prmserve.formats.base import PiecewiseFormat
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec

# How the two label probabilities become a reward: HuggingFaceH4's PRMs read p(label 1), PURE p1 - p0.
REWARDS = ("p1", "p1_minus_p0")


class TokenClassificationFormat(PiecewiseFormat):
    """*ForTokenClassification with two labels: HuggingFaceH4 Qwen2.5-Math-*-PRM-0.2, PURE-PRM-7B, SHARP-PRM.

    `step_separator` is TRL's (default "\\n"; PURE uses "\\n\\n"); `reward` is "p1" or "p1_minus_p0".
    """

    name = "token_classification"
    option_defaults = {"step_separator": "\n", "reward": "p1"}
    piece_special_tokens = False  # TRL tokenises every piece without special tokens, BOS prepended by hand

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        super().__init__(tokenizer, config, **options)
        if (config.num_labels or 2) != 2:
            raise FormatError(f"the token_classification format reads two labels; this model has {config.num_labels}")
        if self.options["reward"] not in REWARDS:
            raise FormatError(f"token_classification has no reward {self.options['reward']!r}; rewards: {', '.join(REWARDS)}")
        separator = self.options["step_separator"]
        if not isinstance(separator, str) or not separator:
            raise FormatError("token_classification's step_separator must be a non-empty string")
        self.separator_ids = list(tokenizer.encode(separator, add_special_tokens=False))
        self.step_forbidden = [separator]
        # The prompt may hold the separator (it is tokenised apart from the steps), so raw ids have no
        # token that marks step ends alone: read_token_id stays None and pre-formatted input is refused.

    @property
    def head(self) -> HeadSpec:
        # transformers' GenericForTokenClassification: `score` Linear(H, num_labels), biased unless the config says not.
        return HeadSpec("linear", "score", out_features=2, bias=bool(self.config.raw.get("token_classification_bias", True)))

    def problem_text(self, problem: str) -> str:
        return problem

    def problem_ids(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return ([] if bos is None else [bos]) + ids

    def close_step(self, ids: list[int]) -> tuple[list[int], int]:
        closed = ids + self.separator_ids
        return closed, len(closed) - 1

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        probabilities = torch.softmax(head_outputs, dim=-1)
        if self.options["reward"] == "p1_minus_p0":
            return self.to_floats(probabilities[:, 1] - probabilities[:, 0])
        return self.to_floats(probabilities[:, 1])
