"""Scoring a JSONL file line by line in batches, resumable: shared by `prmserve score` and the search driver's files.

A bad line becomes an error record of its own; the output is appended to and flushed a line at a time, so a killed
run resumes after the last complete line (`resume_point`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prmserve.errors import FormatError, InvalidInputError
from prmserve.results import ScoreResult


def resume_point(output: Path) -> int:
    """The last input line number fully written to `output`; a torn last line (a killed run) is cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    last = 0
    lines = data[:keep].split(b"\n")[:-1]
    while lines:
        try:
            last = int(json.loads(lines[-1])["line"])
            break
        except (ValueError, KeyError, TypeError):
            keep -= len(lines.pop()) + 1  # a garbled complete line: rewrite it too
    if keep < len(data):
        with output.open("r+b") as f:
            f.truncate(keep)
    return last


def count_lines(path: Path) -> int:
    """Lines in a file (the progress bar's total)."""
    with path.open("rb") as f:
        return sum(1 for _ in f)


def line_batches(source: IO[str], start_after: int, size: int) -> Iterator[list[tuple[int, str]]]:
    """(line number, text) of the lines after `start_after`, `size` at a time."""
    batch: list[tuple[int, str]] = []
    for number, text in enumerate(source, start=1):
        if number <= start_after:
            continue
        batch.append((number, text))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_batch(batch: list[tuple[int, str]], scorer: "Scorer", method: str) -> list[dict[str, Any]]:
    """One output record per non-blank line: input fields + rewards, or an error record."""
    records: dict[int, dict[str, Any]] = {}
    items: list[tuple[int, dict[str, Any]]] = []
    for number, text in batch:
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            records[number] = {"line": number, "error": f"bad JSON: {exc}"}
            continue
        if not isinstance(item, dict):
            records[number] = {"line": number, "error": f"a line must be a JSON object, not {type(item).__name__}"}
            continue
        items.append((number, item))
    outcomes = scorer.score([scored_fields(item) for _, item in items])
    for (number, item), outcome in zip(items, outcomes):
        if isinstance(outcome, Exception):
            records[number] = {"line": number, "error": str(outcome)}
        else:
            rewards = outcome.step_rewards
            records[number] = {**item, "step_rewards": rewards, "aggregate": outcome.aggregate(method), "line": number}
    return [records[n] for n in sorted(records)]


def scored_fields(item: dict[str, Any]) -> dict[str, Any]:
    """The fields the PRM reads; the rest (ids, metadata) only travel to the output."""
    return {k: item[k] for k in ("problem", "steps", "completion", "messages", "step_split", "text", "token_ids") if k in item}


class Scorer:
    """Scores a batch; a bad item becomes its own exception instead of failing the batch."""

    def score(self, items: list[dict[str, Any]]) -> list[ScoreResult | Exception]:
        raise NotImplementedError

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class OfflineScorer(Scorer):
    """A `PRM` in this process: a batch's items queued together, so shared prefixes are computed once."""

    def __init__(self, prm: Any) -> None:
        self.prm = prm

    def score(self, items: list[dict[str, Any]]) -> list[ScoreResult | Exception]:
        try:
            planned: list[Any] = [[job] for job in self.prm.plan_score(items)]  # one tokenizer batch
        except (InvalidInputError, FormatError):  # some item is bad: plan one by one to keep the good ones
            planned = [self._plan_one(item) for item in items]
        jobs = [job for p in planned if not isinstance(p, Exception) for job in p]
        futures = self.prm.submit_jobs(jobs)  # all queued together: shared prefixes are computed once
        results = iter(self.prm.collect(jobs, [f.result() for f in futures]))
        return [p if isinstance(p, Exception) else next(results) for p in planned]

    def _plan_one(self, item: dict[str, Any]) -> list[Any] | Exception:
        try:
            return self.prm.plan_score([item])
        except (InvalidInputError, FormatError) as exc:  # alone in its call: drop the "which item" prefix
            return type(exc)(str(exc).removeprefix("item 0: "))

    def __exit__(self, *exc: object) -> None:
        self.prm.close()


class RemoteScorer(Scorer):
    """A prmserve server through `Client`: a batch in one request, one by one where the server refuses an item."""

    def __init__(self, url: str, api_key: str | None, priority: int) -> None:
        from prmserve.client import Client

        self.client = Client(url, api_key=api_key)
        self.priority = priority

    def score(self, items: list[dict[str, Any]]) -> list[ScoreResult | Exception]:
        if not items:
            return []
        try:
            return list(self.client.score(items, priority=self.priority))
        except InvalidInputError:  # some item is bad: score one by one to keep the good ones
            return [self._one(item) for item in items]

    def _one(self, item: dict[str, Any]) -> ScoreResult | Exception:
        try:
            return self.client.score([item], priority=self.priority)[0]
        except InvalidInputError as exc:  # alone in its request: drop the server's "which item" prefix
            return type(exc)(str(exc).removeprefix("items: item 0: "))

    def __exit__(self, *exc: object) -> None:
        self.client.close()
