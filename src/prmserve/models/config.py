"""Backbone hyper-parameters read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmserve.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class BackboneConfig:
    """What the decoder-only backbones (Qwen2, Llama, Mistral) need to be built."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    attention_bias: bool
    sliding_window: int | None
    torch_dtype: str | None
    architectures: tuple[str, ...] = ()
    num_labels: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "BackboneConfig":
        """Parse a Hugging Face config dict; refuse model types we have no backbone for."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=cfg.get("rope_scaling"),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                # Qwen2 always has q/k/v biases; Llama/Mistral only when the config says so.
                attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                sliding_window=_sliding_window(cfg),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                architectures=tuple(cfg.get("architectures") or ()),
                num_labels=_num_labels(cfg),
                raw=cfg,
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks the key {exc.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: Path) -> "BackboneConfig":
        """Read config.json from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file} not found: a checkpoint directory needs a config.json")
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON: {exc}") from None

    @property
    def num_parameters(self) -> int:
        """Backbone parameter count (embeddings included), for FLOP estimates."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        return self.vocab_size * h + self.num_layers * (attn + 3 * h * i)


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """Qwen2 configs carry a sliding_window that is only active with use_sliding_window."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return int(window)


def _num_labels(cfg: dict[str, Any]) -> int | None:
    if "num_labels" in cfg:
        return int(cfg["num_labels"])
    if "id2label" in cfg:
        return len(cfg["id2label"])
    return None
