"""RLHFlow Llama3.1-8B PRMs: one user turn per step, an assistant "+" after each, all read in one pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prmserve.errors import FormatError, InvalidInputError
from prmserve.formats.base import EncodedItem, PRMFormat
from prmserve.models.heads import HeadSpec

_BASE_TURNS = [{"role": "user", "content": "Problem. Step."}, {"role": "assistant", "content": "+"}]


class RLHFlowFormat(PRMFormat):
    """Reward of step k = softmax([logit("+"), logit("-")])[0] at the token before the k-th assistant "+".

    The reference re-runs the conversation truncated after each step and reads position -3; by
    causality those logits are the full conversation's at the same positions, so one pass serves all.
    """

    name = "rlhflow"

    def __init__(self, tokenizer, config, **options) -> None:
        super().__init__(tokenizer, config, **options)
        if not getattr(tokenizer, "chat_template", None):
            raise FormatError("the rlhflow format needs the checkpoint's chat template")
        self.good_id = self.single_token("+", "good token")
        self.bad_id = self.single_token("-", "bad token")
        # A one-step conversation whose rendering precedes any later turns: continuations are read after it.
        self._base_ids = self._conversation_ids(_BASE_TURNS)

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_rows", rows=(self.good_id, self.bad_id))

    def _conversation_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False, return_dict=False))

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        self.check_item(problem, steps)
        steps = [step.strip() for step in steps]  # RLHFlow's reference strips every step it splits off
        conversation: list[dict[str, str]] = []
        positions: list[int] = []
        prefixes: list[list[int]] = []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{problem} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": "+"})
            prefix = self._conversation_ids(conversation)
            prefixes.append(prefix)
            positions.append(len(prefix) - 3)
        ids = prefixes[-1]
        for prefix in prefixes:
            if ids[: len(prefix)] != prefix:
                raise InvalidInputError("rlhflow: the chat template does not render the conversation prefix-stably")
        return EncodedItem(ids, positions, len(ids))

    def continuation(
        self, last_step: str, new_steps: Sequence[str], known: Mapping[str, list[int]] | None = None
    ) -> tuple[list[int], list[int]] | None:
        # Later turns render the same whatever came before: render them after a one-step stand-in.
        base = self._base_ids
        conversation = list(_BASE_TURNS)
        offsets: list[int] = []
        prefix = base
        for step in new_steps:
            conversation += [{"role": "user", "content": step.strip()}, {"role": "assistant", "content": "+"}]
            longer = self._conversation_ids(conversation)
            if longer[: len(prefix)] != prefix:
                return None
            prefix = longer
            offsets.append(len(prefix) - 3 - len(base))
        return prefix[len(base) :], offsets

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.softmax(head_outputs, dim=-1)[:, 0])
