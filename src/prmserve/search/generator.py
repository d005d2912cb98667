"""The policy side of a search: one reasoning step at a time from any OpenAI-compatible completions server (vLLM's)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from prmserve.errors import InvalidInputError, PRMServeError
from prmserve.search.templates import DEFAULT_PROMPT_TEMPLATE, STEP_SEPARATOR, check_template, step_prompt


class GeneratorError(PRMServeError):
    """The generator cannot be reached or answered with something other than completions: the search cannot go on."""


class GeneratorRejectedError(InvalidInputError):
    """The generator refused one prompt (HTTP 400/422: too long, bad field): that problem fails, the others go on."""


@dataclass(frozen=True)
class Continuation:
    """One sampled step: its text (the separator not included) and why the generator stopped."""

    text: str
    finish_reason: str | None

    @property
    def stopped_at_separator(self) -> bool:
        """True when the generator stopped at the step separator, so the solution may go on."""
        return self.finish_reason == "stop"


class Generator:
    """Samples the next step of (problem, steps so far) from `POST {url}/v1/completions` with `stop=["\\n\\n"]`.

    The prompt is `prompt_template` with `{problem}` replaced by the problem, then each step so far
    followed by the separator. `model` defaults to the first model the server lists in `/v1/models`.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        max_tokens: int = 512,
        temperature: float = 0.8,
        api_key: str | None = None,
        timeout: float = 300.0,
        max_concurrency: int = 32,
    ) -> None:
        if max_tokens < 1 or max_concurrency < 1:
            raise ValueError("max_tokens and max_concurrency must be >= 1")
        self.url = url.rstrip("/")
        self.prompt_template = check_template(prompt_template)
        self.max_tokens = max_tokens
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="prmserve-generator")
        self.model = model if model is not None else self._served_model()

    def prompt(self, problem: str, steps: Sequence[str]) -> str:
        """The text the next step continues: the problem part, then every step so far and its separator."""
        return step_prompt(self.prompt_template, problem, steps)

    def next_steps(self, problem: str, steps: Sequence[str], n: int, seed: int | None) -> list[Continuation]:
        """`n` sampled continuations of one step."""
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt(problem, steps), "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "n": n, "stop": [STEP_SEPARATOR]}
        if seed is not None:
            body["seed"] = seed
        answer = self._send("POST", "/v1/completions", json=body)
        try:
            choices = sorted(answer["choices"], key=lambda choice: choice.get("index", 0))
            continuations = [Continuation(str(choice["text"]), choice.get("finish_reason")) for choice in choices]
        except (KeyError, TypeError, AttributeError):
            raise GeneratorError(f"the generator at {self.url} answered without 'choices[i].text': {str(answer)[:200]}") from None
        if len(continuations) != n:
            raise GeneratorError(f"the generator at {self.url} gave {len(continuations)} choices for n={n}")
        return continuations

    def next_steps_many(self, asks: Sequence[tuple[str, Sequence[str], int, int | None]]) -> list[list[Continuation]]:
        """`next_steps` for each (problem, steps, n, seed), sent concurrently so the server batches them; in order."""
        return list(self._pool.map(lambda ask: self.next_steps(*ask), asks))

    def _served_model(self) -> str:
        try:
            return str(self._send("GET", "/v1/models")["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise GeneratorError(f"the generator at {self.url} lists no model in /v1/models; pass the model name") from None

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GeneratorError(f"cannot reach the generator at {self.url}: {str(exc) or type(exc).__name__}") from None
        if response.status_code in (400, 422):
            raise GeneratorRejectedError(f"the generator at {self.url} refused the request: {response.text[:300]}")
        if not response.is_success:
            raise GeneratorError(f"the generator at {self.url} answered HTTP {response.status_code} to {path}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            raise GeneratorError(f"the generator at {self.url} answered {path} with something other than JSON") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
