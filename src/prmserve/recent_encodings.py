"""Recently encoded (problem, steps) items, so a stateless call that re-sends a known prefix tokenises only its new steps
and hands the engine the prefix-cache keys of the request that carried it (hashing only its new blocks)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from prmserve.engine.request import Request
from prmserve.formats import EncodedItem
from prmserve.nodes import leading_keys


def prefix_keys(problem: str, steps: Sequence[str]) -> list[int]:
    """Key of (problem, steps[:k]) for k = 0..len(steps), chained so all of them cost one pass."""
    keys = [hash(problem)]
    for step in steps:
        keys.append(hash((keys[-1], step)))
    return keys


@dataclass
class Recent:
    """A recent item's encoding and the engine request last made from it (set once planned; its `block_hashes`
    are the prefix-cache keys of its blocks once the engine has scheduled it). The request is let go once its keys
    are taken, so at most the map's capacity of finished requests stay referenced."""

    encoded: EncodedItem
    request: Request | None = None
    keys: list | None = None  # the request's keys, once read

    def hashes_for(self, encoded: EncodedItem, block_size: int) -> list | None:
        """`nodes.leading_keys` of this entry for a request of `encoded`; None while the engine has none yet."""
        if self.request is not None and self.request.block_hashes:
            self.keys, self.request = self.request.block_hashes, None
        return leading_keys(self.encoded, self.keys, encoded, block_size)


class RecentEncodings:
    """An LRU map from (problem, steps) to its encoding; entries are checked against the text on a hit."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[str, tuple[str, ...], Recent]] = OrderedDict()
        self._lock = threading.Lock()

    def longest_prefix(self, problem: str, steps: Sequence[str], keys: list[int]) -> tuple[int, Recent] | None:
        """(k, the entry of problem + steps[:k]) for the largest cached k >= 1, or None."""
        with self._lock:
            for k in range(len(steps), 0, -1):
                entry = self._entries.get(keys[k])
                if entry is not None and entry[0] == problem and entry[1] == tuple(steps[:k]):
                    self._entries.move_to_end(keys[k])
                    return k, entry[2]
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def add(self, problem: str, steps: Sequence[str], key: int, encoded: EncodedItem) -> Recent | None:
        """Remember the item's encoding; the entry, for the caller to attach its request to (None: not kept)."""
        if self.capacity < 1 or encoded.body_len is None:
            return None
        entry = Recent(encoded)
        with self._lock:
            self._entries[key] = (problem, tuple(steps), entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry
