"""Backbone hyper-parameters read from a checkpoint's config.json, as transformers 4.x or 5.x writes it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prmserve.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "internlm2")
# Model types whose sliding window is switched on by use_sliding_window from layer max_window_layers on.
QWEN_WINDOWED = ("qwen2", "qwen3")

# Rope types the backbones implement, with the keys each needs besides rope_type and rope_theta.
ROPE_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}
ATTENTION_TYPES = ("full_attention", "sliding_attention")
# transformers' defaults where a config leaves the key out (RotaryEmbeddingConfigMixin, Qwen2Config).
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_WINDOW_LAYERS = 28
DEFAULT_QWEN3_HEAD_DIM = 128  # Qwen3Config's head_dim when config.json leaves it out


@dataclass(frozen=True)
class BackboneConfig:
    """What the decoder-only backbones (Qwen2, Qwen3, Llama, Mistral) need to be built."""

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
    # Qwen3: an RMSNorm over each query and key head before the rotary embedding.
    qk_norm: bool = False
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
            rope_theta, rope_scaling = _rope(cfg)
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=_head_dim(cfg, model_type, hidden, heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                attention_bias=_attention_bias(cfg, model_type),
                sliding_window=_sliding_window(cfg, model_type, layers),
                # transformers 5 writes `dtype`, 4.x `torch_dtype`; transformers reads `dtype` first.
                torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
                architectures=tuple(cfg.get("architectures") or ()),
                num_labels=_num_labels(cfg),
                qk_norm=model_type == "qwen3",
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


def _head_dim(cfg: dict[str, Any], model_type: str, hidden: int, heads: int) -> int:
    """Per-head width: Qwen3's may differ from hidden / heads and defaults to 128, the others' is hidden / heads."""
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    return DEFAULT_QWEN3_HEAD_DIM if model_type == "qwen3" else hidden // heads


def _attention_bias(cfg: dict[str, Any], model_type: str) -> bool:
    """Qwen2 always has q/k/v biases; Llama/Mistral only when the config says so; Qwen3 and InternLM2 none."""
    if model_type == "qwen2":
        return True
    if model_type == "internlm2":
        # InternLM2's `bias` puts biases on wqkv and wo alike (its config's default is true; the released
        # checkpoints set false); the Llama-style backbone's output projection has none.
        if cfg.get("bias", True):
            raise CheckpointError("config.json's bias is true (or missing) on an internlm2 model; prmserve's backbone has no attention biases")
        return False
    if model_type == "qwen3" and cfg.get("attention_bias", False):
        # Qwen3's attention_bias also puts a bias on o_proj, which the backbone's output projection lacks.
        raise CheckpointError("config.json's attention_bias is true on a qwen3 model; prmserve's Qwen3 backbone has no attention biases")
    return bool(cfg.get("attention_bias", False))


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None) from either layout; both layouts in one file must agree."""
    new = _rope_parameters(cfg)
    old = _legacy_rope(cfg)
    if new is not None and old is not None and new != old:
        raise CheckpointError(
            f"config.json's rope_parameters {cfg['rope_parameters']} disagree with its rope_theta/rope_scaling "
            f"({cfg.get('rope_theta')}, {cfg.get('rope_scaling')}): cannot tell which the model was trained with"
        )
    rope = new or old or {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return float(rope["rope_theta"]), None if rope["rope_type"] == "default" else scaling


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 5's `rope_parameters`: one flat dict holding rope_theta, rope_type and the scaling keys."""
    params = cfg.get("rope_parameters")
    if not params:
        return None
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(
            f"config.json's rope_parameters {params} differ by layer type; prmserve's backbones use one rotary "
            "embedding for every layer"
        )
    # As transformers does: a rope_theta missing from the dict comes from the top level, else its default.
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA))
    return _checked_rope({**params, "rope_theta": theta}, "rope_parameters")


def _legacy_rope(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 4.x's top-level `rope_theta` plus `rope_scaling` (null, or a dict with rope_type or type)."""
    if "rope_theta" not in cfg and not cfg.get("rope_scaling"):
        return None
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json's rope_scaling {scaling!r} is not a dict")
    theta = cfg.get("rope_theta", DEFAULT_ROPE_THETA)
    return _checked_rope({**scaling, "rope_theta": theta}, "rope_scaling")


def _checked_rope(rope: dict[str, Any], where: str) -> dict[str, Any]:
    """The rope dict with its type under `rope_type`, refusing types and keys the backbones do not implement."""
    rope = dict(rope)
    kind = rope.pop("rope_type", None) or rope.get("type") or "default"
    rope.pop("type", None)  # 4.x's older name of rope_type
    if kind not in ROPE_KEYS:
        raise CheckpointError(
            f"config.json's {where}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_KEYS)})"
        )
    keys = set(rope) - {"rope_theta"}
    missing, unknown = ROPE_KEYS[kind] - keys, keys - ROPE_KEYS[kind]
    if missing or unknown:
        problem = f"lack {sorted(missing)}" if missing else f"hold {sorted(unknown)}, which prmserve does not implement"
        raise CheckpointError(f"config.json's {where} of rope_type {kind!r} {problem}")
    return {"rope_type": kind, **rope}


def _sliding_window(cfg: dict[str, Any], model_type: str, num_layers: int) -> int | None:
    """The one window every layer uses (None: full attention), refusing per-layer mixes the backbones lack."""
    types = _layer_types(cfg, model_type, num_layers)
    unknown = sorted(set(types) - set(ATTENTION_TYPES))
    if unknown:
        raise CheckpointError(f"config.json's layer_types holds {unknown}; prmserve knows {', '.join(ATTENTION_TYPES)}")
    if len(types) != num_layers:
        raise CheckpointError(f"config.json's layer_types has {len(types)} entries for {num_layers} layers")
    if "sliding_attention" not in types:
        return None
    if "full_attention" in types:
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        field = "layer_types" if cfg.get("layer_types") is not None else "use_sliding_window/max_window_layers"
        raise CheckpointError(
            f"config.json's {field} put sliding-window attention on layers {sliding} only; prmserve's "
            "backbones use one kind of attention on every layer"
        )
    if model_type == "llama":
        raise CheckpointError("config.json's layer_types ask for sliding_attention, which Llama's backbone does not have")
    window = _window_size(cfg, model_type)
    if window is None:
        raise CheckpointError("config.json's layer_types ask for sliding_attention but it sets no active sliding_window")
    return window


def _layer_types(cfg: dict[str, Any], model_type: str, num_layers: int) -> list[str]:
    """transformers 5's `layer_types`, or the types that 4.x derived from the sliding-window keys."""
    implied = _implied_layer_types(cfg, model_type, num_layers)
    declared = cfg.get("layer_types")
    if declared is None:
        return implied
    if model_type == "mistral" and list(declared) != implied:
        # transformers' Mistral ignores layer_types and slides every layer when sliding_window is set.
        raise CheckpointError(
            f"config.json's layer_types {declared} disagree with its sliding_window {cfg.get('sliding_window')}: "
            "Mistral's modeling code applies one window to every layer (per-layer types are Ministral's)"
        )
    return list(declared)


def _implied_layer_types(cfg: dict[str, Any], model_type: str, num_layers: int) -> list[str]:
    """Qwen2/Qwen3 slide layers from max_window_layers on when use_sliding_window; Mistral slides all when windowed."""
    if model_type in QWEN_WINDOWED:
        first = int(cfg.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS))
        slides = _window_size(cfg, model_type) is not None
        return ["sliding_attention" if slides and i >= first else "full_attention" for i in range(num_layers)]
    windowed = model_type == "mistral" and cfg.get("sliding_window") is not None
    return ["sliding_attention" if windowed else "full_attention"] * num_layers


def _window_size(cfg: dict[str, Any], model_type: str) -> int | None:
    """The configured window; Qwen2/Qwen3 configs carry one that is only active with use_sliding_window."""
    window = cfg.get("sliding_window")
    if window is None or (model_type in QWEN_WINDOWED and not cfg.get("use_sliding_window", False)):
        return None
    return int(window)


def _num_labels(cfg: dict[str, Any]) -> int | None:
    if "num_labels" in cfg:
        return int(cfg["num_labels"])
    if "id2label" in cfg:
        return len(cfg["id2label"])
    return None
