"""Recently encoded (problem, steps) items, so a stateless call that re-sends a known prefix tokenises only its new steps."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from prmserve.formats import EncodedItem


def prefix_keys(problem: str, steps: Sequence[str]) -> list[int]:
    """Key of (problem, steps[:k]) for k = 0..len(steps), chained so all of them cost one pass."""
    keys = [hash(problem)]
    for step in steps:
        keys.append(hash((keys[-1], step)))
    return keys


class RecentEncodings:
    """An LRU map from (problem, steps) to its encoding; entries are checked against the text on a hit."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[str, tuple[str, ...], EncodedItem]] = OrderedDict()
        self._lock = threading.Lock()

    def longest_prefix(self, problem: str, steps: Sequence[str], keys: list[int]) -> tuple[int, EncodedItem] | None:
        """(k, encoding of problem + steps[:k]) for the largest cached k >= 1, or None."""
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

    def add(self, problem: str, steps: Sequence[str], key: int, encoded: EncodedItem) -> None:
        if self.capacity < 1 or encoded.body_len is None:
            return
        with self._lock:
            self._entries[key] = (problem, tuple(steps), encoded)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
