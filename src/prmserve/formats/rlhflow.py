"""RLHFlow Llama3.1-8B PRMs: one user turn per step, an assistant "+" after each, all read in one pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prmserve.errors import FormatError, InvalidInputError
from prmserve.formats.base import EncodedItem, PRMFormat, encode_batched
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
        self._base_ids = self._conversations_ids([_BASE_TURNS])[0]

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_rows", rows=(self.good_id, self.bad_id))

    def _conversations_ids(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """Each conversation's ids, the chat template's own tokenisation, in one batched call."""
        if not conversations:
            return []
        ids = self.tokenizer.apply_chat_template(conversations, tokenize=True, add_generation_prompt=False, return_dict=False)
        return [list(one) for one in ids]

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        return self._from_prefixes(self._conversations_ids(self._prefix_conversations(problem, steps)))

    def encode_many(self, items: Sequence[tuple[Any, Any]]) -> list[EncodedItem | InvalidInputError | FormatError]:
        """`encode` of each item, every step prefix of every item tokenised in one call."""
        return encode_batched(items, self._prefix_conversations, self._conversations_ids, lambda ids, _: self._from_prefixes(ids))

    def _prefix_conversations(self, problem: str, steps: Sequence[str]) -> list[list[dict[str, str]]]:
        """The checked item's conversation truncated after each step, as the reference builds it: a user turn per
        step, an assistant "+" after it."""
        self.check_item(problem, steps)
        conversation: list[dict[str, str]] = []
        prefixes = []
        for k, step in enumerate(step.strip() for step in steps):  # RLHFlow's reference strips every step it splits off
            conversation = conversation + [{"role": "user", "content": f"{problem} {step}" if k == 0 else step},
                                           {"role": "assistant", "content": "+"}]
            prefixes.append(conversation)
        return prefixes

    @staticmethod
    def _from_prefixes(prefixes: Sequence[list[int]]) -> EncodedItem:
        """The whole conversation's ids, read 3 tokens before each prefix's end, as the reference reads position -3."""
        ids = prefixes[-1]
        for prefix in prefixes:
            if ids[: len(prefix)] != prefix:
                raise InvalidInputError("rlhflow: the chat template does not render the conversation prefix-stably")
        return EncodedItem(ids, [len(prefix) - 3 for prefix in prefixes], len(ids))

    def continuation(
        self, last_step: str, new_steps: Sequence[str], known: Mapping[str, list[int]] | None = None
    ) -> tuple[list[int], list[int]] | None:
        # Later turns render the same whatever came before: render them after a one-step stand-in.
        base = self._base_ids
        conversation, conversations = list(_BASE_TURNS), []
        for step in new_steps:
            conversation = conversation + [{"role": "user", "content": step.strip()}, {"role": "assistant", "content": "+"}]
            conversations.append(conversation)
        offsets: list[int] = []
        prefix = base
        for longer in self._conversations_ids(conversations):  # one batched call for all the new steps
            if longer[: len(prefix)] != prefix:
                return None
            prefix = longer
            offsets.append(len(prefix) - 3 - len(base))
        return prefix[len(base) :], offsets

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        return self.to_floats(torch.softmax(head_outputs, dim=-1)[:, 0])
