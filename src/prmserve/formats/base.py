"""What every PRM format does: (problem, steps) -> token ids + positions to read; head outputs -> rewards."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prmserve.errors import FormatError, InvalidInputError
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec


@dataclass(frozen=True)
class EncodedItem:
    """An item ready for the engine: its token ids and the positions whose head outputs give rewards.

    `body_len`: `token_ids[:body_len]` begins the ids of this item with more steps appended, and
    `token_ids[body_len:]` is the closing tail (e.g. `<|im_end|>\n`) that follows the last step;
    None for pre-formatted input, which cannot be extended.
    `step_ends`: for formats whose step reward sums several read positions (an implicit PRM's tokens),
    the index in `read_positions` of each step's last one; None when each position is one step.
    """

    token_ids: list[int]
    read_positions: list[int]
    body_len: int | None = None
    step_ends: tuple[int, ...] | None = None

    @property
    def tail(self) -> list[int]:
        return self.token_ids[self.body_len :] if self.body_len is not None else []


class PRMFormat(ABC):
    """One PRM family's input layout and scoring rule, exactly as its reference code has them."""

    name: ClassVar[str]
    # Option name -> default; only these keyword options are accepted.
    option_defaults: ClassVar[dict[str, Any]] = {}
    # Formats that read a reward at every occurrence of one token (a separator or step tag) set it.
    read_token_id: int | None = None
    # Texts a step may not contain (its separator or tag): each would create a phantom step.
    step_forbidden: Sequence[str] = ()
    # Whether a scored item can be extended by more steps (tree search); outcome models give one score.
    extendable: ClassVar[bool] = True
    # Whether a step's reward depends on the tokens after it (the implicit PRM's last step counts the end of
    # the turn, a middle one the next step's first token): an extended node's rewards are then read again
    # from the child's cached head outputs instead of being kept.
    rescores_node_on_extend: ClassVar[bool] = False

    def __init__(self, tokenizer: Any, config: BackboneConfig, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            known = ", ".join(self.option_defaults) or "none"
            raise FormatError(f"format {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        self.tokenizer = tokenizer
        self.config = config
        self.options = {**self.option_defaults, **options}
        # Chat/control tokens: text containing one would change the input's structure.
        self.special_tokens = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        self._anchor: tuple[str, list[int]] = ("", [])  # the last `ids_after` anchor and its ids

    @property
    @abstractmethod
    def head(self) -> HeadSpec:
        """The head this format reads (built and filled by the model loader)."""

    @abstractmethod
    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        """Token ids of the model's input for these steps, and one read position per step."""

    def encode_many(self, items: Sequence[tuple[Any, Any]]) -> list[EncodedItem | InvalidInputError | FormatError]:
        """`encode` of each (problem, steps), an item's error in its place (so a caller can name the item).
        `RenderedFormat`s tokenise all the items' texts in one batch."""
        return [attempt(self.encode, problem, steps) for problem, steps in items]

    def encode_text(self, text: str) -> EncodedItem:
        """A pre-formatted input string (separators already in place), as users of other engines send it."""
        return self.encode_token_ids(self.tokenizer.encode(text))

    def encode_token_ids(self, token_ids: Sequence[int]) -> EncodedItem:
        """Pre-tokenised input; the read positions are found from the separator tokens."""
        if self.read_token_id is None:
            raise FormatError(f"format {self.name!r} needs problem and steps: it cannot find steps in raw text or ids")
        ids = list(token_ids)
        return EncodedItem(ids, self.positions_of(ids, self.read_token_id))

    @abstractmethod
    def rewards(self, head_outputs: torch.Tensor) -> list[float]:
        """One reward per row of head outputs [rows, width] (model dtype) at read positions.

        Row by row, so the rows of many items can be scored in one call.
        """

    def step_rewards(self, row_rewards: list[float], encoded: EncodedItem) -> list[float]:
        """One item's step rewards from `rewards` of its read positions, in order: those rows themselves,
        unless the format sums several rows per step (`EncodedItem.step_ends`)."""
        return row_rewards

    def extend(self, node: EncodedItem, problem: str, node_steps: Sequence[str], new_steps: Sequence[str],
               known: Mapping[str, list[int]] | None = None) -> EncodedItem:
        """The item (problem, node_steps + new_steps), built from the node's ids and the new steps alone.

        Only the new steps are tokenised (`continuation`); where the tokenizer would merge text across
        the boundary, the whole item is encoded instead, so the ids always equal `encode`'s. `known`: ids of
        boundary texts tokenised ahead, many children at once (`encode_boundaries`).
        """
        if not self.extendable or node.body_len is None:
            raise FormatError(f"format {self.name!r} cannot extend this item with more steps")
        self.check_steps(new_steps, first_index=len(node_steps))
        appended = self.continuation(node_steps[-1], new_steps, known)
        if appended is None:
            return self.encode(problem, list(node_steps) + list(new_steps))
        ids, offsets = appended
        body = node.body_len
        return EncodedItem(
            node.token_ids[:body] + ids + node.tail,
            node.read_positions + [body + o for o in offsets],
            body + len(ids),
        )

    def continuation(self, last_step: str, new_steps: Sequence[str], known: Mapping[str, list[int]] | None = None
                     ) -> tuple[list[int], list[int]] | None:
        """Ids that follow an item's body when `new_steps` come after its last step, and the read
        offsets among them; None when they cannot be tokenised apart from what precedes them.

        By default: the `boundary` text tokenised after its anchor (`ids_after`), one read token per new step.
        """
        pair = self.boundary(last_step, new_steps)
        if pair is None:
            return None
        ids = self.ids_after(*pair, known)
        offsets = None if ids is None else self.read_offsets(ids, len(new_steps))
        return None if offsets is None else (ids, offsets)

    def boundary(self, last_step: str, new_steps: Sequence[str]) -> tuple[str, str] | None:
        """(anchor, text): the new steps' text and the text before it that the tokenizer must see with it (the end of
        the node's last step, or a special token that stops merges); None where children cannot be tokenised apart."""
        return None

    def encode_boundaries(self, last_step: str, children: Sequence[Any]) -> dict[str, list[int]]:
        """Ids of every valid child's `anchor + text`, tokenised in one batch (the Rust backend's threads): the
        `known` of `extend`. Children that are not lists of strings are left to `extend` to refuse."""
        return self.boundary_ids([(last_step, steps) for steps in children])

    def boundary_ids(self, extensions: Sequence[tuple[str, Any]]) -> dict[str, list[int]]:
        """`encode_boundaries` of (last step, new steps) pairs of different nodes: one batch for all of them."""
        texts = []
        for last_step, steps in extensions:
            if isinstance(steps, Sequence) and not isinstance(steps, str) and steps and all(isinstance(t, str) for t in steps):
                pair = self.boundary(last_step, steps)
                if pair is not None:
                    texts.append(pair[0] + pair[1])
        return dict(zip(texts, plain_ids_batch(self.tokenizer, texts))) if len(texts) > 1 else {}

    # Shared checks ---------------------------------------------------------------------------

    def check_item(self, problem: Any, steps: Any) -> None:
        """Refuse what would score wrongly: no steps, non-strings, empty steps, separator text inside."""
        if not isinstance(problem, str) or not problem.strip():
            raise InvalidInputError("'problem' must be a non-empty string")
        self.check_text(problem, "the problem")
        for token in self.special_tokens:
            if token in problem:
                raise InvalidInputError(f"the problem contains the special token {token!r}, which would change the input's structure")
        self.check_steps(steps)

    def check_steps(self, steps: Any, first_index: int = 0) -> None:
        """Every step a non-empty string without special tokens or the format's separator."""
        if isinstance(steps, str) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise InvalidInputError("'steps' must be a non-empty list of strings")
        for i, step in enumerate(steps, start=first_index):
            if not isinstance(step, str):
                raise InvalidInputError(f"step {i} is a {type(step).__name__}, not a string")
            if not step.strip():
                raise InvalidInputError(f"step {i} is empty")
            self.check_text(step, f"step {i}")
            for token in self.special_tokens:
                if token in step:
                    raise InvalidInputError(f"step {i} contains the special token {token!r}, which would change the input's structure")
            for text in self.step_forbidden:
                if text and text in step:
                    raise InvalidInputError(
                        f"step {i} contains {text!r}, the {self.name} separator: it would create a phantom step"
                    )

    @staticmethod
    def check_text(text: str, what: str) -> None:
        """Text a tokenizer can encode: no lone surrogates (JSON allows them, UTF-8 does not)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{what} holds a character that is not valid Unicode text at index {exc.start}") from None

    def ids_after(self, anchor: str, text: str, known: Mapping[str, list[int]] | None = None) -> list[int] | None:
        """Ids of `text` as tokenised right after `anchor`, or None if the two merge across the boundary.

        A node's children share its anchor, so the anchor's ids are remembered (the last one) rather than redone;
        `anchor + text` may be in `known` already.
        """
        cached = self._anchor  # one read: other threads may replace it meanwhile
        if cached[0] == anchor and anchor:
            anchor_ids = cached[1]
        else:
            anchor_ids = plain_ids(self.tokenizer, anchor)
            self._anchor = (anchor, anchor_ids)
        full = anchor + text
        ids = known.get(full) if known else None
        if ids is None:
            ids = plain_ids(self.tokenizer, full)
        if ids[: len(anchor_ids)] != anchor_ids:
            return None
        return ids[len(anchor_ids) :]

    def read_offsets(self, ids: list[int], steps: int) -> list[int] | None:
        """Positions of the read token in continuation ids, if there is exactly one per new step."""
        offsets = self.positions_of(ids, self.read_token_id)
        return offsets if len(offsets) == steps else None

    def single_token(self, text: str, what: str) -> int:
        """The id of text that must tokenise to exactly one token (a separator, a label token)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise FormatError(f"{what} {text!r} is {len(ids)} tokens in this tokenizer; it must be exactly one")
        return ids[0]

    @staticmethod
    def positions_of(token_ids: Sequence[int], token_id: int) -> list[int]:
        """Every position holding token_id."""
        return [i for i, t in enumerate(token_ids) if t == token_id]

    def expect_count(self, positions: list[int], steps: int, separator: str) -> list[int]:
        """The tokenizer must leave exactly one separator per step, or rewards would be misassigned."""
        if len(positions) != steps:
            raise InvalidInputError(
                f"{self.name}: found {len(positions)} {separator!r} separators for {steps} steps after tokenisation "
                "(a step or the problem merges with or contains the separator)"
            )
        return positions

    def to_floats(self, values: torch.Tensor) -> list[float]:
        """Python floats of a tensor whatever its dtype (bf16 values are exact in float)."""
        return [float(x) for x in values.float().tolist()]


class RenderedFormat(PRMFormat):
    """A format whose input is one rendered text tokenised whole (`tokenizer.encode`): many items' texts are
    tokenised in one batch call, on the Rust tokenizer's threads, with the same ids as one by one."""

    # Whether the tokenizer adds its special tokens (BOS) to the rendered text, as the family's reference code does.
    add_special_tokens: bool = True

    @abstractmethod
    def render(self, problem: str, steps: Sequence[str]) -> str:
        """The checked item's text."""

    @abstractmethod
    def from_ids(self, ids: list[int], steps: Sequence[str]) -> EncodedItem:
        """The item from its text's ids: read positions and body."""

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        text = self.render(problem, steps)
        return self.from_ids(list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)), steps)

    def encode_many(self, items: Sequence[tuple[Any, Any]]) -> list[EncodedItem | InvalidInputError | FormatError]:
        return encode_batched(
            items, lambda problem, steps: [self.render(problem, steps)],
            lambda texts: self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"],
            lambda ids, steps: self.from_ids(list(ids[0]), steps),
        )


class PiecewiseFormat(PRMFormat):
    """A format whose input is the problem's ids, then every step tokenised on its own and closed by its read
    token(s), as the reference builds it: nothing crosses a boundary, so children extend by their steps alone,
    and all the pieces of a call are tokenised in one batch call (the same ids as one by one)."""

    # Whether every piece is tokenised with the tokenizer's special tokens, as the reference calls `encode`.
    piece_special_tokens: bool = True

    @abstractmethod
    def problem_text(self, problem: str) -> str:
        """The text of the input's first piece."""

    def problem_ids(self, ids: list[int]) -> list[int]:
        """The first piece's ids as the input begins with them (where the reference prepends a BOS by hand)."""
        return ids

    @abstractmethod
    def close_step(self, ids: list[int]) -> tuple[list[int], int]:
        """A step's ids followed by what closes it, and the offset of its read token among them."""

    def encode(self, problem: str, steps: Sequence[str]) -> EncodedItem:
        pieces = self.piece_ids(self._texts(problem, steps))
        return self._assembled(pieces[0], pieces[1:])

    def encode_many(self, items: Sequence[tuple[Any, Any]]) -> list[EncodedItem | InvalidInputError | FormatError]:
        return encode_batched(items, self._texts, self.piece_ids, lambda ids, steps: self._assembled(ids[0], ids[1:]))

    def _texts(self, problem: str, steps: Sequence[str]) -> list[str]:
        """The checked item's pieces: the problem's text, then every step."""
        self.check_item(problem, steps)
        return [self.problem_text(problem), *steps]

    def continuation(self, last_step: str, new_steps: Sequence[str], known: Mapping[str, list[int]] | None = None
                     ) -> tuple[list[int], list[int]]:
        return self._joined(self.piece_ids(list(new_steps)))

    def piece_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text tokenised alone; more than one in one batch call."""
        if len(texts) == 1:
            return [list(self.tokenizer.encode(texts[0], add_special_tokens=self.piece_special_tokens))]
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=self.piece_special_tokens)["input_ids"]]

    def _joined(self, steps: list[list[int]]) -> tuple[list[int], list[int]]:
        """The closed steps' ids one after another, and their read offsets."""
        ids: list[int] = []
        offsets = []
        for step in steps:
            closed, offset = self.close_step(step)
            offsets.append(len(ids) + offset)
            ids += closed
        return ids, offsets

    def _assembled(self, problem: list[int], steps: list[list[int]]) -> EncodedItem:
        head = self.problem_ids(problem)
        ids, offsets = self._joined(steps)
        return EncodedItem(head + ids, [len(head) + o for o in offsets], len(head) + len(ids))


def encode_batched(
    items: Sequence[tuple[Any, Any]], pieces: Callable[[Any, Any], list], tokenize: Callable[[list], Sequence],
    build: Callable[[Sequence, Any], EncodedItem],
) -> list[EncodedItem | InvalidInputError | FormatError]:
    """Items encoded with one tokenizer call for all: `pieces(problem, steps)` checks an item and lists what of it is
    tokenised (texts, conversations), `tokenize` does a list of those at once, `build(ids, steps)` makes the item from
    its pieces' ids. An item's input error comes back in its place."""
    prepared = [attempt(pieces, problem, steps) for problem, steps in items]
    flat = [piece for mine in prepared if not isinstance(mine, Exception) for piece in mine]
    ids = tokenize(flat) if flat else []
    out, start = [], 0
    for (_, steps), mine in zip(items, prepared):
        if isinstance(mine, Exception):
            out.append(mine)
            continue
        out.append(attempt(build, ids[start : start + len(mine)], steps))
        start += len(mine)
    return out


def attempt(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args), or the input error it raised (returned, so a batch goes on and names the item)."""
    try:
        return function(*args)
    except (InvalidInputError, FormatError) as exc:
        return exc


def chat_messages(system_prompt: str | None, user: str, assistant: str) -> list[dict[str, str]]:
    """A system (optional), user, assistant conversation in the chat-template message format."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render with the checkpoint's own chat template, as the model cards do."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError("this checkpoint's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, straight from a fast tokenizer's Rust backend where it
    has one (the same ids, a quarter less time: tree search tokenises every child's new steps on the hot path)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def plain_ids_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`plain_ids` of many texts; a fast tokenizer's backend encodes them on its own threads, outside the GIL."""
    backend = getattr(tokenizer, "_tokenizer", None)
    # encode_batch_fast (tokenizers >= 0.21) leaves out the character offsets: ~20% less time, the same ids.
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is not None:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    return [plain_ids(tokenizer, text) for text in texts]
