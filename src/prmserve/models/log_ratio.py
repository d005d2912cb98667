"""An implicit PRM's two causal LMs as one model: per token, log pi(y_t | y<t) - log pi_ref(y_t | y<t).

The policy (the PRM checkpoint) and its reference read the same tokens, so they run in the same
batches over one KV pool whose layers are the policy's and then the reference's: the engine sees one
model, one set of block tables and one prefix cache, and a cached block holds both models' keys and
values and the token's log-ratio. Both need the same KV layout (heads x head size) and dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prmserve.errors import CheckpointError
from prmserve.models.attention import AttentionInputs
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.transformer import RewardModel


class LogRatioModel(nn.Module):
    """The policy and the reference over the same packed tokens; one output per token: their log-prob difference."""

    def __init__(self, policy: RewardModel, reference: RewardModel, head: HeadSpec) -> None:
        super().__init__()
        a, b = policy.config, reference.config
        if (a.num_kv_heads, a.head_dim) != (b.num_kv_heads, b.head_dim):
            raise CheckpointError(
                f"the reference model's KV heads x head size ({b.num_kv_heads} x {b.head_dim}) differ from the policy's "
                f"({a.num_kv_heads} x {a.head_dim}): the two cannot share one KV pool"
            )
        self.policy, self.reference = policy, reference
        self.head_spec = head
        # The KV pool's view of the pair: both models' layers; token ids valid for both.
        self.config = dataclasses.replace(a, num_layers=a.num_layers + b.num_layers, vocab_size=min(a.vocab_size, b.vocab_size))
        self.num_kv_heads = a.num_kv_heads

    @property
    def attention_backend(self) -> str:
        return self.policy.attention_backend

    def set_attention_kernel(self, backend: str) -> None:
        """Choose the attention kernel of both models."""
        self.policy.set_attention_kernel(backend)
        self.reference.set_attention_kernel(backend)

    def compile_layers(self, mode: str | None = None) -> None:
        """Compile both models' per-layer code."""
        self.policy.compile_layers(mode)
        self.reference.compile_layers(mode)

    def use_blocked_kernels(self) -> None:
        """CPU batch invariance (`RewardModel.use_blocked_kernels`) for both models, their LM heads included."""
        for model in (self.policy, self.reference):
            model.use_blocked_kernels()
            model.head.blocked = True

    # The per-layer functions CUDA graph capture swaps for their eager versions, on both models.
    @property
    def _project(self) -> Callable:
        return self.policy._project

    @_project.setter
    def _project(self, fn: Callable) -> None:
        self.policy._project = self.reference._project = fn

    @property
    def _finish(self) -> Callable:
        return self.policy._finish

    @_finish.setter
    def _finish(self, fn: Callable) -> None:
        self.policy._finish = self.reference._finish = fn

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """[T, 1]: log pi(token_t) - log pi_ref(token_t), each after the row before it in its chunk (0 on a first row)."""
        split, cache = self.policy.config.num_layers, inputs.kv_cache
        policy = _token_log_probs(self.policy, input_ids, positions, inputs, None if cache is None else cache[:split])
        reference = _token_log_probs(self.reference, input_ids, positions, inputs, None if cache is None else cache[split:])
        return (policy - reference)[:, None]


def _token_log_probs(
    model: RewardModel, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs, cache: torch.Tensor | None
) -> torch.Tensor:
    """One model's log-probabilities of the packed tokens, its layers' keys and values in `cache`."""
    hidden = model(input_ids, positions, dataclasses.replace(inputs, kv_cache=cache))  # the head passes the final norm's output
    return model.head.log_probs(hidden, input_ids, inputs.cu_seqlens_q)


def load_log_ratio_model(directory: Path, cfg: BackboneConfig, head: HeadSpec, device: torch.device, dtype: torch.dtype) -> LogRatioModel:
    """The checkpoint in `directory` paired with `head.reference_model` (a local directory or a hub ID, fetched
    into the Hugging Face cache), each with the lm_logprob head over its own vocabulary."""
    from prmserve.models.loader import load_reward_model, resolve_checkpoint  # the loader dispatches here

    reference_dir = resolve_checkpoint(head.reference_model)
    reference_cfg = BackboneConfig.from_file(reference_dir)
    policy = load_reward_model(directory, cfg, HeadSpec("lm_logprob", out_features=cfg.vocab_size), device, dtype)
    reference = load_reward_model(
        reference_dir, reference_cfg, HeadSpec("lm_logprob", out_features=reference_cfg.vocab_size), device, dtype
    )
    return LogRatioModel(policy, reference, head)
