"""What a search scored, node by node: the tree that the output record carries, and each path's steps and rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prmserve.results import aggregate

FINAL_MARKERS = ("\\boxed", "The answer is", "####")  # a step holding one of these states the answer (#### N: GSM8K's)


def states_answer(step: str) -> bool:
    """True when the step gives the final answer, so the solution ends with it."""
    return any(marker in step for marker in FINAL_MARKERS)


@dataclass(eq=False)
class SearchNode:
    """One scored step: its path's rewards from the root, and the PRM handle while the search keeps it."""

    id: int
    parent: SearchNode | None
    step: str
    step_rewards: list[float]
    aggregate: float
    finished: bool
    handle: str | None = field(default=None, repr=False)

    @property
    def depth(self) -> int:
        """Steps on the path from the problem to this node, itself included."""
        return len(self.step_rewards)

    def steps(self) -> list[str]:
        """The steps of the path from the problem to this node."""
        path, node = [], self
        while node is not None:
            path.append(node.step)
            node = node.parent
        return path[::-1]

    def chosen(self) -> dict[str, Any]:
        """The output's "chosen" field for this node's path."""
        return {"steps": self.steps(), "step_rewards": self.step_rewards, "aggregate": self.aggregate, "finished": self.finished}


class SearchTree:
    """Every node one problem's search scored, in the order they were scored."""

    def __init__(self, method: str) -> None:
        self.method = method  # how paths are ranked: min, last, mean or prod of their step rewards
        self.nodes: list[SearchNode] = []

    def add(self, parent: SearchNode | None, step: str, step_rewards: list[float], finished: bool,
            handle: str | None = None) -> SearchNode:
        """Record a scored step; `step_rewards` are its whole path's."""
        node = SearchNode(len(self.nodes), parent, step, list(step_rewards), aggregate(step_rewards, self.method), finished, handle)
        self.nodes.append(node)
        return node

    def add_path(self, steps: list[str], step_rewards: list[float], finished: bool) -> SearchNode:
        """Record a whole scored solution as a chain of nodes (its prefixes' rewards are its leading rewards); the leaf."""
        node = None
        for depth, step in enumerate(steps, start=1):
            node = self.add(node, step, step_rewards[:depth], finished and depth == len(steps))
        assert node is not None, "a scored solution has at least one step"
        return node

    def records(self) -> list[dict[str, Any]]:
        """The output's "tree" field."""
        return [{"id": n.id, "parent": n.parent.id if n.parent is not None else None, "step": n.step,
                 "step_rewards": n.step_rewards, "aggregate": n.aggregate, "depth": n.depth, "finished": n.finished}
                for n in self.nodes]
