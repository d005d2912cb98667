"""One scoring request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools
import os
import secrets
import time
from dataclasses import dataclass, field

import torch

from prmserve.results import TokenUsage

_arrivals = itertools.count()
_id_prefix = secrets.token_hex(10)
_ids = itertools.count()


def _new_process() -> None:
    """A forked child draws its own prefix, so its ids never repeat its parent's."""
    global _id_prefix
    _id_prefix = secrets.token_hex(10)


os.register_at_fork(after_in_child=_new_process)


def new_request_id() -> str:
    """A unique request id (kept nodes' handles are these): a random prefix per process and a counter.

    uuid4 reads the OS's entropy on every call (~14 us here); a tree search makes one id per child, on the hot path.
    The random prefix keeps ids unique across processes and restarts, so a stale handle never names a new node.
    """
    return f"{_id_prefix}{next(_ids):012x}"


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds its blocks; some tokens still to compute
    FINISHED = "finished"


@dataclass
class Request:
    """Token ids to prefill and the positions whose head outputs are wanted."""

    request_id: str
    token_ids: list[int]
    read_positions: list[int]
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV came from the prefix cache
    num_done: int = 0  # tokens whose KV is in the pool (cached + computed so far)
    outputs: torch.Tensor | None = None  # head outputs at read_positions, once finished
    ready: torch.cuda.Event | None = None  # CUDA: recorded once `outputs` are written (read them via `readout.reading`)
    # Prefix-cache keys of its full blocks; may start as a parent's keys, continued for the rest.
    block_hashes: list[tuple[int, tuple[int, ...]]] | None = None
    keep_tokens: int = 0  # once finished, pin the cached blocks of its first keep_tokens tokens
    # (source block, own block, count): the first `count` slots of a cached block hold this request's next tokens;
    # the runner copies them into its own block before the step that computes the rest (then clears this).
    copy_in: tuple[int, int, int] | None = None
    # The same, from a block the same step computes: attention reads those keys from the source's slots, and the
    # runner copies them into its own block after the forward (then clears this).
    share_in: tuple[int, int, int] | None = None
    input_tokens: int | None = None  # the input's length, where tokens after the last read position were left out
    created_at: float = field(default_factory=time.monotonic)  # when it was built, just before submission
    scheduled_at: float | None = None  # when the scheduler first admitted it (set once)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower priority value first, then first come first served."""
        return (self.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        return self.num_tokens - self.num_done

    @property
    def queue_seconds(self) -> float | None:
        """Time from creation to first being scheduled (vLLM's queue time); None until admitted."""
        return None if self.scheduled_at is None else self.scheduled_at - self.created_at

    @property
    def usage(self) -> TokenUsage:
        return TokenUsage(self.input_tokens or self.num_tokens, self.num_tokens - self.num_cached, self.num_cached)
