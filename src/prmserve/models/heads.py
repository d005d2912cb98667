"""Reward heads: the few kinds of map from a final hidden state to a PRM's raw outputs.

A format names the head it needs with a `HeadSpec`; the loader fills it from the checkpoint.
Every head is a linear map or a small MLP, cheap enough to run at every token, so the engine can
keep each token's head output beside its KV and read cached rewards back without recomputing. The one
exception reads the whole LM head: "lm_logprob" (implicit PRMs), the log-probability of each token given
the ones before it, which `TokenLogProbs` (models/token_logprobs.py) computes one slice of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prmserve.models.token_logprobs import TokenLogProbs


@dataclass(frozen=True)
class HeadSpec:
    """Which head to build and where its weights are in the checkpoint.

    kind: "mlp" (Linear(H,H)+ReLU+Linear(H,out), both with bias, tensors `{source}.0.*`/`{source}.2.*`),
    "linear" (`{source}.weight` [out,H], optional `{source}.bias`), "lm_rows" (chosen rows of the LM
    head, e.g. good/bad tokens), "lm_mean" (the mean of all LM-head rows: mean logit as one dot), or
    "lm_logprob" (the whole LM head, `out_features` = the vocabulary: each token's log-probability given
    the tokens before it).
    `reference_model` (lm_logprob only): a second causal LM, a directory or hub ID, whose log-probabilities
    are subtracted token by token (an implicit PRM's log-ratio); the loader pairs the two models.
    """

    kind: str
    source: str = "lm_head"
    out_features: int = 1
    rows: tuple[int, ...] = ()
    bias: bool = False
    reference_model: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "linear", "lm_rows", "lm_mean", "lm_logprob"):
            raise ValueError(f"unknown head kind {self.kind!r}")
        if self.kind == "lm_rows" and not self.rows:
            raise ValueError("an lm_rows head needs the rows it reads")
        if self.reference_model is not None and self.kind != "lm_logprob":
            raise ValueError("only an lm_logprob head takes a reference model")

    @property
    def reads_lm_head(self) -> bool:
        """Whether the head's weight comes from the checkpoint's LM head (or the embedding it is tied to)."""
        return self.kind in ("lm_rows", "lm_mean", "lm_logprob")

    @property
    def needs_previous_token(self) -> bool:
        """Whether a token's output needs the hidden state of the token before it (a token's log-probability):
        a chunk that follows cached tokens is then run from one token earlier."""
        return self.kind == "lm_logprob"

    @property
    def width(self) -> int:
        """Number of values the head gives per token."""
        if self.kind == "lm_rows":
            return len(self.rows)
        if self.kind in ("lm_mean", "lm_logprob"):
            return 1
        return self.out_features


def build_head(spec: HeadSpec, hidden: int) -> nn.Module:
    """An empty head module of the right shape; the loader fills its weights."""
    if spec.kind == "lm_logprob":
        return TokenLogProbs(hidden, spec.out_features)
    if spec.kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, spec.out_features))
    if spec.kind == "linear":
        return nn.Linear(hidden, spec.out_features, bias=spec.bias)
    return nn.Linear(hidden, spec.width, bias=False)


def head_tensor_names(spec: HeadSpec) -> dict[str, str]:
    """Checkpoint tensor name for each of the head module's parameters (mlp and linear heads)."""
    if spec.kind == "mlp":
        return {f"{i}.{p}": f"{spec.source}.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    if spec.kind == "linear":
        names = {"weight": f"{spec.source}.weight"}
        if spec.bias:
            names["bias"] = f"{spec.source}.bias"
        return names
    return {}


def lm_head_weight(spec: HeadSpec, lm_weight: torch.Tensor) -> torch.Tensor:
    """The head's weight derived from the full LM head [vocab, H] (all of it, rows, or their float32 mean)."""
    if spec.kind == "lm_logprob":
        return lm_weight
    if spec.kind == "lm_rows":
        vocab = lm_weight.shape[0]
        bad = [r for r in spec.rows if not 0 <= r < vocab]
        if bad:
            raise ValueError(f"token ids {bad} are outside the LM head's {vocab} rows")
        return lm_weight[list(spec.rows)]
    return lm_weight.float().mean(dim=0, keepdim=True)
