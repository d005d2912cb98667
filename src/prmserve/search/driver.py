"""Best-of-N and beam search for one problem: a generator proposes steps, a PRM (local or served) ranks them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prmserve.errors import InvalidInputError
from prmserve.results import AGGREGATIONS, ScoreResult
from prmserve.search.tree import SearchNode, SearchTree, states_answer

if TYPE_CHECKING:  # the driver itself needs no httpx: `prmserve --help` reads METHODS from here
    from prmserve.search.generator import Continuation, Generator

METHODS = ("best-of-n", "beam")


class Scorer(Protocol):
    """What the search needs of a PRM: `prmserve.PRM` and `prmserve.Client` both are one."""

    def score(self, items: Sequence[Mapping[str, Any]], *, keep: bool = False) -> list[ScoreResult]: ...

    def extend(self, handle: str, children: Sequence[Sequence[str]], *, keep: bool = False) -> list[ScoreResult]: ...

    def release(self, handles: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class SearchConfig:
    """How to search: best-of-`n` solutions, or a beam of `width` paths each asking `width` continuations;
    at most `depth` steps; paths ranked by `aggregate` of their step rewards; generator seeds start at `seed`."""

    method: str = "best-of-n"
    n: int = 16
    width: int = 4
    depth: int = 40
    aggregate: str = "min"
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown search method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregate!r}; choose one of {', '.join(AGGREGATIONS)}")
        if min(self.n, self.width, self.depth) < 1:
            raise ValueError("n, width and depth must be >= 1")

    def seed_of(self, index: int) -> int | None:
        """The generator seed of the `index`-th request of a level: distinct, so equal prompts sample differently."""
        return None if self.seed is None else self.seed + index


@dataclass(frozen=True)
class SearchResult:
    """The picked path and every node scored on the way."""

    chosen: SearchNode
    tree: SearchTree

    def record(self) -> dict[str, Any]:
        """The output fields: "chosen" and "tree"."""
        return {"chosen": self.chosen.chosen(), "tree": self.tree.records()}


def search(problem: str, generator: Generator, scorer: Scorer, config: SearchConfig) -> SearchResult:
    """Search one problem by `config.method`."""
    if config.method == "beam":
        return beam_search(problem, generator, scorer, config)
    return best_of_n(problem, generator, scorer, config)


def _step_of(continuation: Continuation) -> str:
    """The step a continuation adds, stripped; empty when the generator gave nothing."""
    return continuation.text.strip()


def _ends(continuation: Continuation, step: str) -> bool:
    """A path ends when the generator stopped for another reason than the separator, or the step states the answer."""
    return not continuation.stopped_at_separator or states_answer(step)


def _best(nodes: Sequence[SearchNode]) -> SearchNode:
    """The highest aggregate; the first of equals."""
    return max(nodes, key=lambda node: node.aggregate)


def best_of_n(problem: str, generator: Generator, scorer: Scorer, config: SearchConfig) -> SearchResult:
    """N solutions sampled step by step (at most `depth` steps), scored in one call; the highest aggregate wins."""
    paths: list[list[str]] = [[] for _ in range(config.n)]
    ended = [False] * config.n
    live = list(range(config.n))
    for _ in range(config.depth):
        if not live:
            break
        answers = generator.next_steps_many([(problem, paths[i], 1, config.seed_of(i)) for i in live])
        for i, (continuation,) in zip(live, answers):
            step = _step_of(continuation)
            if step:
                paths[i].append(step)
            ended[i] = not step or _ends(continuation, step)
        live = [i for i in live if not ended[i]]
    sampled = [i for i in range(config.n) if paths[i]]
    if not sampled:
        raise InvalidInputError("the generator gave no step for this problem")
    results = scorer.score([{"problem": problem, "steps": paths[i]} for i in sampled])
    tree = SearchTree(config.aggregate)
    leaves = [tree.add_path(paths[i], r.step_rewards, ended[i]) for i, r in zip(sampled, results)]
    return SearchResult(_best(leaves), tree)


class _Handles:
    """The PRM handles a beam search holds, so every one is released, whatever happens."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.held: set[str] = set()

    def keep(self, handle: str | None) -> str:
        assert handle is not None, "score/extend with keep=True give every result a handle"
        self.held.add(handle)
        return handle

    def release(self, nodes: Sequence[SearchNode | None]) -> None:
        handles = [n.handle for n in nodes if n is not None and n.handle in self.held]
        if handles:
            self.scorer.release(handles)
            self.held.difference_update(handles)
        for node in nodes:
            if node is not None:
                node.handle = None

    def release_all(self) -> None:
        if self.held:
            self.scorer.release(sorted(self.held))
            self.held.clear()


def beam_search(problem: str, generator: Generator, scorer: Scorer, config: SearchConfig) -> SearchResult:
    """Each live beam asks `width` continuations of one step; the best `width` children overall go on.

    Children are scored with `extend` on their parent's handle (only the new step is computed); finished
    children (an answer, or the generator stopped) leave the search. The best finished path wins, else the
    best live one at `depth`.
    """
    tree = SearchTree(config.aggregate)
    handles = _Handles(scorer)
    finished: list[SearchNode] = []
    live: list[SearchNode | None] = [None]  # None: the problem alone, before the first step
    try:
        for _ in range(config.depth):
            asks = [(problem, beam.steps() if beam else [], config.width, config.seed_of(k)) for k, beam in enumerate(live)]
            children: list[SearchNode] = []
            expanding = []
            for beam, continuations in zip(live, generator.next_steps_many(asks)):
                proposals = [(_step_of(c), c) for c in continuations if _step_of(c)]
                if not proposals:  # the generator ends this path where it is
                    if beam is not None:
                        beam.finished = True
                        finished.append(beam)
                    continue
                expanding.append((beam, proposals))
            # One call per beam, all at once, so the engine scores the level's children in one batch.
            with ThreadPoolExecutor(max_workers=max(1, len(expanding))) as pool:
                scored = list(pool.map(lambda bp: _score_children(scorer, problem, bp[0], [s for s, _ in bp[1]]), expanding))
            for (beam, proposals), results in zip(expanding, scored):
                for (step, c), result in zip(proposals, results):
                    children.append(tree.add(beam, step, result.step_rewards, _ends(c, step), handles.keep(result.handle)))
            handles.release(live)
            ranked = sorted(children, key=lambda node: -node.aggregate)  # stable: ties keep their order
            top = ranked[: config.width]
            handles.release(ranked[config.width :] + [node for node in top if node.finished])
            finished += [node for node in top if node.finished]
            live = [node for node in top if not node.finished]
            if not live:
                break
    finally:
        handles.release_all()
    candidates = finished or [node for node in live if node is not None]
    if not candidates:
        raise InvalidInputError("the generator gave no step for this problem")
    return SearchResult(_best(candidates), tree)


def _score_children(scorer: Scorer, problem: str, beam: SearchNode | None, steps: list[str]) -> list[ScoreResult]:
    """Score one step after each path: the first steps as whole items, later ones as children of the beam's node."""
    if beam is None:
        return scorer.score([{"problem": problem, "steps": [step]} for step in steps], keep=True)
    assert beam.handle is not None, "a live beam keeps its handle until its children are scored"
    return scorer.extend(beam.handle, [[step] for step in steps], keep=True)
