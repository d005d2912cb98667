"""PRM formats: one file per family, each turning (problem, steps) into ids and head outputs into rewards."""

from __future__ import annotations

import re
from typing import Any

from prmserve.errors import FormatError
from prmserve.formats.base import EncodedItem, PRMFormat
from prmserve.formats.implicit_prm import ImplicitPRMFormat
from prmserve.formats.llemma import LlemmaFormat
from prmserve.formats.math_shepherd import MathShepherdFormat
from prmserve.formats.outcome import OutcomeFormat
from prmserve.formats.qwen_prm import QwenPRMFormat
from prmserve.formats.rlhflow import RLHFlowFormat
from prmserve.formats.skywork_prm import SkyworkPRMFormat
from prmserve.formats.token_classification import TokenClassificationFormat
from prmserve.formats.universal_prm import UniversalPRMFormat
from prmserve.models.config import BackboneConfig

FORMATS: dict[str, type[PRMFormat]] = {
    f.name: f
    for f in (
        QwenPRMFormat,
        SkyworkPRMFormat,
        MathShepherdFormat,
        RLHFlowFormat,
        LlemmaFormat,
        OutcomeFormat,
        TokenClassificationFormat,
        UniversalPRMFormat,
        ImplicitPRMFormat,
    )
}

# Architectures that name their format without doubt.
_BY_ARCHITECTURE = {
    "Qwen2ForProcessRewardModel": "qwen_prm",
    "Qwen2ForPrmModel": "skywork_prm",
    "Qwen2ForRewardModel": "outcome",
    "InternLM2ForRewardModel": "outcome",
}


# Checkpoints whose config is a plain causal LM, known by their name (the hub ID's or the directory's last part).
_BY_NAME = {re.compile(r"EurusPRM-Stage[12]", re.IGNORECASE): "implicit_prm"}


def detect_format(config: BackboneConfig, tensor_names: set[str] | None = None, name: str | None = None) -> str:
    """The format implied by the checkpoint (its name, the name its config was saved from, its architecture,
    its tensors), or a FormatError asking for `format=`."""
    for candidate in (name, config.raw.get("_name_or_path")):
        last = str(candidate or "").rstrip("/").rsplit("/", 1)[-1]
        for pattern, format_name in _BY_NAME.items():
            if pattern.fullmatch(last):
                return format_name
    for arch in config.architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
        if arch.endswith("ForSequenceClassification"):
            return "outcome"
        if arch.endswith("ForTokenClassification") and (config.num_labels or 2) == 2:
            return "token_classification"  # TRL's PRMTrainer output: two labels per token
    if tensor_names and "v_head.summary.weight" in tensor_names:
        return "skywork_prm"  # Skywork's value head on a config that calls itself a causal LM
    archs = ", ".join(config.architectures) or "none"
    raise FormatError(
        f"cannot tell the PRM format from architectures [{archs}]: pass format=one of {', '.join(FORMATS)}"
    )


def make_format(name: str, tokenizer: Any, config: BackboneConfig, **options: Any) -> PRMFormat:
    """Instantiate a format by name, refusing unknown names and options."""
    if name not in FORMATS:
        raise FormatError(f"unknown format {name!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[name](tokenizer, config, **options)


__all__ = ["FORMATS", "EncodedItem", "PRMFormat", "detect_format", "make_format"]
