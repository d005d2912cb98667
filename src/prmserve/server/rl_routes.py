"""Routes in the RL frameworks' own protocols: OpenRLHF's `POST /get_reward` and vLLM's `POST /classify`
(verl's reward loop), both reading prompt + response as one chat-formatted text."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request

from prmserve.errors import InvalidInputError
from prmserve.integrations.chat_text import split_chat_text
from prmserve.integrations.openrlhf import items_from_queries, reward_body
from prmserve.results import ScoreResult
from prmserve.server.protocol import ClassifyData, ClassifyRequest, ClassifyResponse, GetRewardRequest, PoolingUsage

ScoreItems = Callable[[Request, list[dict[str, Any]], str], Awaitable[list[ScoreResult]]]


def add_rl_routes(app: FastAPI, score_items: ScoreItems, dependencies: list, errors: dict, names: Sequence[str],
                  rl_aggregate: str, refuse: Callable[[int, str, str, str], Exception]) -> None:
    """Register /get_reward and /classify; `score_items` scores {problem, completion} items like /v1/score."""

    @app.post("/get_reward", responses=errors, dependencies=dependencies)
    async def get_reward(body: GetRewardRequest, request: Request) -> dict:
        """OpenRLHF's remote reward model: one reward per query (the step rewards reduced by --rl-aggregate)."""
        try:
            items = items_from_queries(body.query, body.prompts)
        except InvalidInputError as exc:
            raise refuse(400, f"query: {exc}", "InvalidInputError", "query") from None
        results = await score_items(request, items, "query")
        return reward_body([r.aggregate(rl_aggregate) for r in results], [len(r.step_rewards) for r in results])

    @app.post("/classify", response_model=ClassifyResponse, responses=errors | {404: errors[400]}, dependencies=dependencies)
    async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
        """vLLM's classify: `probs` = [1 - reward, reward] per input, the reward reduced by --rl-aggregate."""
        if body.model is not None and body.model not in names:
            raise refuse(404, f"the model {body.model!r} does not exist; this server serves {names[0]!r}", "not_found", "model")
        if not body.activation:
            raise refuse(400, "activation=false asks for raw logits; a process reward has none per input (use /pooling)",
                         "InvalidInputError", "activation")
        texts = [body.input] if isinstance(body.input, str) else body.input
        items = []
        for index, text in enumerate(texts):
            try:
                problem, response = split_chat_text(text)
            except InvalidInputError as exc:
                raise refuse(400, f"input {index}: {exc}", "InvalidInputError", "input") from None
            items.append({"problem": problem, "completion": response})
        results = await score_items(request, items, "input")
        rewards = [r.aggregate(rl_aggregate) for r in results]
        tokens = sum(r.usage.prompt_tokens for r in results)
        return ClassifyResponse(
            model=body.model or names[0],
            data=[ClassifyData(index=i, probs=[1.0 - r, r], num_classes=2) for i, r in enumerate(rewards)],
            usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
