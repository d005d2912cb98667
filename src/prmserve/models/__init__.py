"""Native PyTorch backbones (Qwen2, Qwen3, Llama, Mistral), reward heads, and the checkpoint loader."""

from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.loader import load_reward_model, resolve_checkpoint
from prmserve.models.transformer import RewardModel

__all__ = ["BackboneConfig", "HeadSpec", "RewardModel", "load_reward_model", "resolve_checkpoint"]
