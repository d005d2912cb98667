"""Scored nodes kept for tree search: what a handle stands for, how long it lives, and when it goes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prmserve.errors import HandleNotFoundError
from prmserve.formats import EncodedItem


@dataclass(frozen=True)
class Node:
    """A kept item: enough to build its children's ids and rewards without touching its text again."""

    problem: str
    steps: tuple[str, ...]
    encoded: EncodedItem
    step_rewards: list[float]
    block_hashes: list | None  # the engine's prefix-cache keys of its blocks, continued by children


def leading_keys(parent: EncodedItem, keys: list | None, child: EncodedItem, block_size: int) -> list | None:
    """The parent's prefix-cache keys that hold for the child's leading blocks: those of the parent's whole body
    blocks, when the child's ids begin with the parent's body (always, unless the tokenizer forced a whole
    re-encoding that came out different); None where there are none."""
    body = parent.body_len
    if not keys or body is None or child.token_ids[:body] != parent.token_ids[:body]:
        return None
    return keys[: body // block_size]


class NodeTable:
    """Handles -> nodes, thread-safe. A handle unused for `ttl` seconds expires; beyond `max_handles`
    the least recently used goes. `on_drop(handle)` runs for every handle that leaves (to unpin it)."""

    def __init__(self, ttl: float, max_handles: int, on_drop: Callable[[str], None]) -> None:
        if ttl <= 0 or max_handles < 1:
            raise ValueError("handle_ttl must be > 0 and max_handles >= 1")
        self.ttl, self.max_handles, self.on_drop = ttl, max_handles, on_drop
        self._nodes: OrderedDict[str, tuple[Node, float]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, handle: object) -> bool:
        return handle in self._nodes

    def add(self, handle: str, node: Node) -> None:
        with self._lock:
            self._nodes[handle] = (node, time.monotonic())
            dropped = self._expire_locked()
            while len(self._nodes) > self.max_handles:
                dropped.append(self._nodes.popitem(last=False)[0])
        self._drop(dropped)

    def get(self, handle: str) -> Node:
        """The node, marked as just used; HandleNotFoundError if it is gone."""
        with self._lock:
            dropped = self._expire_locked()
            entry = self._nodes.get(handle) if isinstance(handle, str) else None
            if entry is not None:
                self._nodes[handle] = (entry[0], time.monotonic())
                self._nodes.move_to_end(handle)
        self._drop(dropped)
        if entry is None:
            raise HandleNotFoundError(f"no node with handle {handle!r}: never issued, released, or expired")
        return entry[0]

    def release(self, handles: Iterable[str]) -> int:
        """Forget these handles; the number that existed."""
        with self._lock:
            released = [h for h in handles if isinstance(h, str) and self._nodes.pop(h, None) is not None]
            expired = self._expire_locked()
        self._drop(released + expired)
        return len(released)

    def expire(self) -> int:
        """Drop every handle unused for longer than the ttl; how many went."""
        with self._lock:
            dropped = self._expire_locked()
        self._drop(dropped)
        return len(dropped)

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._nodes)
            self._nodes.clear()
        self._drop(dropped)

    def _expire_locked(self) -> list[str]:
        cutoff = time.monotonic() - self.ttl
        dropped = []
        while self._nodes:
            handle, (_, used) = next(iter(self._nodes.items()))
            if used > cutoff:
                break
            self._nodes.popitem(last=False)
            dropped.append(handle)
        return dropped

    def _drop(self, handles: list[str]) -> None:
        for handle in handles:
            self.on_drop(handle)
