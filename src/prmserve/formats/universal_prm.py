"""AURORA Universal-PRM-7B: one sequence per step prefix, sigmoid of the head's scalar at its last token (EOS).

The model card scores step k by building a whole new input for the first k steps: the chat template
(system "You are a helpful assistant.", user = the question + "\\n\\n###\\n\\nThe reference answer is: "
+ the reference answer or a fixed sentence saying there is none, generation prompt on), then
`tokenizer("\\n\\n".join(steps[:k]) + "\\n\\n")` and the EOS id; reward = sigmoid(output) there. Every
prefix ends in "\\n\\n" + EOS, which the longer prefixes do not contain, so one engine sequence cannot
hold them all: `prefixes` gives one `EncodedItem` per step (the engine's prefix cache shares the
question and the earlier steps between them), and `encode` takes only a single step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prmserve.errors import FormatError
from prmserve.formats.base import EncodedItem, PRMFormat
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec

UNIVERSAL_SYSTEM_PROMPT = "You are a helpful assistant."
REFERENCE_INTRO = "\n\n###\n\nThe reference answer is: "
NO_REFERENCE = "There is no reference answer for this question."


class UniversalPRMFormat(PRMFormat):
    """infly/Universal-PRM-7B (Qwen2.5 backbone, one-output head read at the EOS after each prefix).

    Options: `system_prompt` (the card's), `reference_answer` (None: the card's "no reference" text),
    `step_separator` ("\\n\\n", also written after the last step of each prefix).
    """

    name = "universal_prm"
    extendable = False  # each step is its own sequence; extension needs the prefixes hook in PRM
    option_defaults = {"system_prompt": UNIVERSAL_SYSTEM_PROMPT, "reference_answer": None, "step_separator": "\n\n"}

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        super().__init__(tokenizer, config, **options)
        if (config.num_labels or 1) != 1:
            raise FormatError(f"the universal_prm format reads one output; this model has {config.num_labels}")
        if tokenizer.eos_token_id is None:
            raise FormatError("universal_prm appends the tokenizer's EOS after every prefix; this tokenizer has none")
        separator = self.options["step_separator"]
        if not isinstance(separator, str) or not separator:
            raise FormatError("universal_prm's step_separator must be a non-empty string")
        reference = self.options["reference_answer"]
        if reference is not None and not isinstance(reference, str):
            raise FormatError("universal_prm's reference_answer must be a string or None")
        self.step_forbidden = [separator]

    @property
    def head(self) -> HeadSpec:
        # A Qwen2ForSequenceClassification-style `score` Linear(H, 1) without bias (not confirmed from the
        # released checkpoint's files, whose modeling code is remote).
        return HeadSpec("linear", "score", out_features=1, bias=False)

    def question(self, problem: str) -> str:
        """The card's user turn: the question, then the reference answer or the sentence saying there is none."""
        reference = self.options["reference_answer"]
        return problem + REFERENCE_INTRO + (reference if reference else NO_REFERENCE)

    def query_ids(self, problem: str) -> list[int]:
        """The chat template's ids for system + user with the generation prompt (the card's `query_id`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise FormatError("this checkpoint's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        messages = [{"role": "user", "content": self.question(problem)}]
        if self.options["system_prompt"]:
            messages.insert(0, {"role": "system", "content": self.options["system_prompt"]})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # as apply_chat_template(tokenize=True)

    def prefixes(self, problem: str, steps: Sequence[str]) -> list[EncodedItem]:
        """One item per step k: the query, the first k steps each followed by the separator, the EOS; read at the EOS."""
        self.check_item(problem, steps)
        query = self.query_ids(problem)
        separator = self.options["step_separator"]
        items = []
        for k in range(1, len(steps) + 1):
            answer = list(self.tokenizer.encode(separator.join(steps[:k]) + separator))  # the card's tokenizer(responses)
            ids = query + answer + [self.tokenizer.eos_token_id]
            items.append(EncodedItem(ids, [len(ids) - 1]))
        return items

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        items = self.prefixes(problem, steps)
        if len(items) != 1:
            raise FormatError(
                f"universal_prm scores each of the {len(items)} step prefixes as its own sequence; "
                "this item needs one request per prefix (score one step at a time, or pass each prefix as token_ids)"
            )
        return items[0]

    def encode_token_ids(self, token_ids: Sequence[int]) -> EncodedItem:
        ids = list(token_ids)  # one prefix, EOS last: its reward is read at the last token
        return EncodedItem(ids, [len(ids) - 1] if ids else [])

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.sigmoid(head_outputs[:, 0]))  # in the model dtype, as the card
