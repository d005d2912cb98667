"""Where a request goes among replicas: its home (a node handle's replica), else by its problem's consistent hash
(rendezvous hashing, so a replica's death moves only its own problems), else to the least loaded replica.

A request id carries its route: `<id>#<key>` (planned, by problem), then `@<replica>` once sent there (a node's
children inherit its route); a kept request's id is its node's handle, so handles carry their replica and key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def problem_key(problem: str) -> str:
    """A short stable hash of a problem's text (the same in every process, unlike `hash`)."""
    return hashlib.blake2b(problem.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def with_key(request_id: str, key: str) -> str:
    return f"{base_id(request_id)}#{key}"


def with_home(request_id: str, replica: int) -> str:
    return f"{request_id.partition('@')[0]}@{replica}"


def routed_like(request_id: str, handle: str) -> str:
    """A child's id routed as its node's handle is: the same key and replica."""
    return base_id(request_id) + handle[len(base_id(handle)) :]


def base_id(request_id: str) -> str:
    """The id without its route."""
    return request_id.partition("@")[0].partition("#")[0]


def home_of(request_id: str) -> int | None:
    """The replica an id (or handle) names, if any."""
    _, at, replica = request_id.partition("@")
    return int(replica) if at and replica.isdigit() else None


def key_of(request_id: str) -> str | None:
    _, mark, key = request_id.partition("@")[0].partition("#")
    return key if mark else None


def rendezvous_order(key: str, replicas: Sequence[int]) -> list[int]:
    """Replicas ranked for `key`, highest random weight first: each key's first choice is spread evenly, and
    losing a replica moves only the keys that ranked it first."""
    weight = lambda r: hashlib.blake2b(f"{key}/{r}".encode(), digest_size=8).digest()  # noqa: E731
    return sorted(replicas, key=weight, reverse=True)


def choose_replica(request_id: str, loads: dict[int, int], max_imbalance: int) -> int:
    """The replica for a request, among `loads` (live replica -> requests in flight): its home when alive; else its
    key's first choice unless that one holds more than `max_imbalance` requests above the least loaded (then the next
    choice within that bound); else the least loaded."""
    home = home_of(request_id)
    if home is not None and home in loads:
        return home
    least = min(loads.values())
    key = key_of(request_id)
    if key is not None:
        for replica in rendezvous_order(key, list(loads)):
            if loads[replica] <= least + max_imbalance:
                return replica
    return min(loads, key=lambda r: (loads[r], r))
