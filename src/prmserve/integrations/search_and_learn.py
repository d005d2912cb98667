"""search-and-learn (huggingface/search-and-learn): its PRM interface, served by prmserve.

sal's searches call `prm.score(questions, outputs)` with one question per entry and that question's
answers, and read `[question][answer][step]` rewards; answers are split into steps on "\\n\\n", as
sal's own PRM classes do (empty pieces, e.g. from a trailing "\\n\\n", are dropped). Replace
`prm = load_prm(config)` with `prm = PRM(config.prm_path)` (local) or `PRM("http://host:8000")`.
"""

from __future__ import annotations

from typing import Any

from prmserve.errors import InvalidInputError

STEP_SPLIT = "\n\n"


class PRM:
    """`score(questions, outputs) -> [question][answer][step]`, by a local model or a prmserve server.

    `url_or_model`: an `http(s)://` URL of a prmserve server (options go to `prmserve.Client`, e.g.
    `api_key`), else a model for `prmserve.PRM` (options go there, e.g. `dtype`).
    """

    def __init__(self, url_or_model: str | None = None, **options: Any) -> None:
        if isinstance(url_or_model, str) and url_or_model.startswith(("http://", "https://")):
            from prmserve.client import Client

            self._scorer = Client(url_or_model, **options)
        else:
            from prmserve.prm import PRM as LocalPRM

            self._scorer = LocalPRM(url_or_model, **options)

    def score(self, questions: list[str], outputs: list[list[str]]) -> list[list[list[float]]]:
        """Step rewards of every answer of every question, in their order."""
        if len(questions) != len(outputs):
            raise InvalidInputError(f"{len(questions)} questions but {len(outputs)} lists of answers")
        items = [{"problem": q, "completion": a, "step_split": STEP_SPLIT} for q, answers in zip(questions, outputs) for a in answers]
        results = iter(self._scorer.score(items)) if items else iter(())
        return [[next(results).step_rewards for _ in answers] for answers in outputs]

    def close(self) -> None:
        self._scorer.close()
