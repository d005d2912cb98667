"""EurusPRM-Stage1/-Stage2 (PRIME-RL): an implicit PRM, beta * log(pi / pi_ref) summed over the tokens so far.

As the model card's code does it (both stages): the input is the chat template over [user: question,
assistant: the steps joined by "\\n\\n"] without a generation prompt; the PRM and its reference
(Qwen/Qwen2.5-Math-7B-Instruct) give every token's log-probability; each token counts
beta * (log pi - log pi_ref) (beta = the card's `coef`, 0.001) from `step_last_tokens[0]` on, and step k's
reward is the running sum at `step_last_tokens[k] + 1`. `step_last_tokens[k]` is the token count, minus 2,
of the conversation holding only the first k steps, stripped, with "\\n\\n" appended unless k is 0 or the
last step: so the sum starts at the assistant header's last token, a middle step's runs to the first
token of the step after it, and the last step's to the end-of-turn token. No sigmoid. `reward="per_step"`
gives the card's r_t = q_t - q_(t-1) instead of the running sum q_t the code prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch

from prmserve.errors import FormatError, InvalidInputError
from prmserve.formats.base import EncodedItem, PRMFormat, render_chat
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec

EURUS_REFERENCE_MODEL = "Qwen/Qwen2.5-Math-7B-Instruct"
EURUS_BETA = 0.001
STEP_JOINER = "\n\n"
REWARDS = ("cumulative", "per_step")


class ImplicitPRMFormat(PRMFormat):
    """PRIME-RL/EurusPRM-Stage1 and -Stage2 (plain Qwen2ForCausalLM checkpoints) with their reference model.

    Options: `reference_model` (a directory or hub ID sharing the tokenizer; the card's default),
    `beta` (0.001), `reward` ("cumulative", the card's output, or "per_step").
    """

    name = "implicit_prm"
    option_defaults = {"reference_model": EURUS_REFERENCE_MODEL, "beta": EURUS_BETA, "reward": "cumulative"}
    rescores_node_on_extend = True  # a node's last step counts its end-of-turn token; in a child it counts the next step's first

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        super().__init__(tokenizer, config, **options)
        reference, beta = self.options["reference_model"], self.options["beta"]
        if not isinstance(reference, str) or not reference:
            raise FormatError("implicit_prm's reference_model must be a directory or a hub ID")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise FormatError(f"implicit_prm's beta must be a positive number, not {beta!r}")
        if self.options["reward"] not in REWARDS:
            raise FormatError(f"implicit_prm's reward must be one of {', '.join(REWARDS)}, not {self.options['reward']!r}")

    @property
    def head(self) -> HeadSpec:
        return HeadSpec("lm_logprob", out_features=self.config.vocab_size, reference_model=self.options["reference_model"])

    def conversation(self, problem: str, steps: Sequence[str]) -> str:
        """The card's chat: the question as the user turn, the steps joined by "\\n\\n" as the answer."""
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": STEP_JOINER.join(steps)}]
        return render_chat(self.tokenizer, messages)

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        self.check_item(problem, steps)
        return self._encoded(problem, list(steps), None, [])

    def extend(self, node: EncodedItem, problem: str, node_steps: Sequence[str], new_steps: Sequence[str],
               known: Mapping[str, list[int]] | None = None) -> EncodedItem:
        """As `encode` of all the steps, tokenising only the prefixes that change: the node's last step and the new ones
        (a step prefix's text is the same in node and child unless it ends at the node's last step). No `boundary`
        text exists here (the whole conversation is re-tokenised), so `known` is never filled."""
        if node.step_ends is None or node.body_len is None:
            raise FormatError(f"format {self.name!r} cannot extend this item with more steps")
        self.check_steps(new_steps, first_index=len(node_steps))
        first = node.read_positions[0]
        return self._encoded(problem, list(node_steps) + list(new_steps), first, [first + e for e in node.step_ends[:-1]])

    def _encoded(self, problem: str, steps: list[str], first: int | None, ends: list[int]) -> EncodedItem:
        """The item's ids and reads; `first` and the `ends` of the leading steps when already known."""
        ids = list(self.tokenizer.encode(self.conversation(problem, steps), add_special_tokens=False))
        # The card's step_last_tokens: each step prefix's conversation tokenised on its own (one batched call).
        todo = ([0] if first is None else []) + list(range(len(ends) + 1, len(steps) + 1))
        prefixes = [self.conversation(problem, steps[:k]).strip() + (STEP_JOINER if 0 < k < len(steps) else "") for k in todo]
        last_tokens = [len(p) - 2 for p in self.tokenizer(prefixes, add_special_tokens=False)["input_ids"]]
        if first is None:
            first, last_tokens = last_tokens[0], last_tokens[1:]
        ends = ends + [t + 1 for t in last_tokens]
        if first < 1 or any(not first <= end < len(ids) for end in ends):
            raise InvalidInputError(
                f"{self.name}: the step prefixes' token counts do not fall inside the whole input's {len(ids)} tokens "
                "(a step merges with the chat template's markers)"
            )
        return EncodedItem(ids, list(range(first, max(ends) + 1)), body_len=ends[-1],
                           step_ends=tuple(end - first for end in ends))

    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        """beta * (log pi - log pi_ref) of each token read."""
        return self.to_floats(self.options["beta"] * head_outputs[:, 0].float())

    def step_rewards(self, row_rewards: list[float], encoded: EncodedItem) -> list[float]:
        """The running sum of the tokens' rewards at each step's end (per_step: its increase over the step)."""
        running = list(accumulate(row_rewards))
        q = [running[end] for end in encoded.step_ends]
        if self.options["reward"] == "per_step":
            return [q[0]] + [b - a for a, b in zip(q, q[1:])]
        return q
