"""The engine tests' plain reference: the model's head outputs on one whole sequence, run directly (no engine, no cache)."""

from __future__ import annotations

import torch

from prmserve.models.attention import AttentionInputs


def uncached_outputs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Head outputs of ``model`` at every position of ``token_ids``, computed in one uncached forward on CPU."""
    n = len(token_ids)
    with torch.inference_mode():
        return model(torch.tensor(token_ids), torch.arange(n), AttentionInputs.uncached([n], "cpu"))
