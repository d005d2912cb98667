"""Search every problem of a JSONL file into another, one line each, resuming where a killed run stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prmserve.batch import resume_point
from prmserve.errors import FormatError, HandleNotFoundError, InvalidInputError
from prmserve.problem_lines import parse_problem_line
from prmserve.search.driver import Scorer, SearchConfig, search
from prmserve.search.generator import Generator

# What fails one problem only (a bad line, a step the PRM refuses, a prompt the generator refuses); anything
# else (a generator or server gone) stops the run, and a rerun resumes after the last complete line.
PROBLEM_ERRORS = (InvalidInputError, FormatError, HandleNotFoundError)


def search_file(
    problems: Path, output: Path, generator: Generator, scorer: Scorer, config: SearchConfig, progress: bool = True,
) -> list[dict[str, Any]]:
    """Append one record per non-blank problem line after those already in `output`; the error records written."""
    from tqdm import tqdm

    if not problems.is_file():
        raise InvalidInputError(f"no such problems file: {problems}")
    lines = problems.read_text(encoding="utf-8").splitlines()
    done = resume_point(output)
    errors = []
    with output.open("a", encoding="utf-8") as out, tqdm(total=len(lines), initial=min(done, len(lines)), desc="searching",
                                                         unit="problem", disable=not progress) as bar:
        for number, text in enumerate(lines[done:], start=done + 1):
            if text.strip():
                record = search_line(number, text, generator, scorer, config)
                if "error" in record:
                    errors.append(record)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            bar.update(1)
    return errors


def search_line(number: int, text: str, generator: Generator, scorer: Scorer, config: SearchConfig) -> dict[str, Any]:
    """The output record of one input line: its fields + "chosen" + "tree" + "line", or {"line", "error"}."""
    try:
        problem = parse_problem_line(text)
        return {**problem, **search(problem["problem"], generator, scorer, config).record(), "line": number}
    except PROBLEM_ERRORS as exc:
        return {"line": number, "error": str(exc)}

