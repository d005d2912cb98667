"""config.json as transformers 4.x writes it and as transformers 5.x re-saves it gives the same backbone and
the same rewards, for every backbone; what the backbones do not implement is refused, not defaulted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prmserve import PRM
from prmserve.errors import CheckpointError
from prmserve.models.config import BackboneConfig
from reference import reference_step_rewards
from tiny_checkpoints import FORMAT_OF, build, resaved_by_transformers, with_config

FP32_TOLERANCE = 1e-5
# Long enough (40+ tokens) that a 16-token sliding window changes the rewards.
ITEMS = [
    (
        "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4. How many are left?",
        ["Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.", "Step 2: She bakes with 4, so 13 - 4 = 9.", "The answer is: 9"],
    ),
    ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."]),
]
# (checkpoint, 4.x config keys changed) for every backbone and the attention / rope variants it supports.
CASES: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen_prm", {}),
    "qwen2-sliding_window": ("qwen_prm", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    "llama-llama3_rope": ("rlhflow", {}),
    "llama-linear_rope": ("rlhflow", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mistral": ("math_shepherd", {}),
    "mistral-sliding_window": ("math_shepherd", {"sliding_window": 16}),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(4.x dir, 5.x dir) of a case, built once."""
    root = tmp_path_factory.mktemp("config_versions")
    built: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in built:
            name, changes = CASES[case]
            base = build(name, root / name) if not (root / name).exists() else root / name
            v4 = with_config(base, root / f"{case}-v4", **changes)
            built[case] = (v4, resaved_by_transformers(v4, root / f"{case}-v5"))
        return built[case]

    return get


def rewards(ckpt: Path, name: str) -> list[list[float]]:
    prm = PRM(str(ckpt), format=FORMAT_OF[name], device="cpu", dtype="float32")
    try:
        return [r.step_rewards for r in prm.score([{"problem": p, "steps": s} for p, s in ITEMS])]
    finally:
        prm.close()


def config_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_both_layouts_give_the_same_backbone_and_rewards(case: str, layouts) -> None:
    name = CASES[case][0]
    v4, v5 = layouts(case)
    old, new = config_of(v4), config_of(v5)
    assert {"torch_dtype", "rope_theta"} <= set(old) and not {"dtype", "rope_parameters"} & set(old)
    assert {"dtype", "rope_parameters"} <= set(new) and not {"torch_dtype", "rope_theta", "rope_scaling"} & set(new)
    assert BackboneConfig.from_file(v4) == BackboneConfig.from_file(v5)
    got_v4, got_v5 = rewards(v4, name), rewards(v5, name)
    assert got_v4 == got_v5
    for ckpt in (v4, v5):  # transformers reads both layouts too: both match its reference
        want = [reference_step_rewards(FORMAT_OF[name], ckpt, p, s) for p, s in ITEMS]
        error = max(abs(a - b) for g, w in zip(got_v4, want, strict=True) for a, b in zip(g, w, strict=True))
        assert error <= FP32_TOLERANCE, f"{ckpt.name}: max |prmserve - reference| = {error:.3g}"


def test_rlhflow_resaved_by_transformers_5_keeps_its_rope(layouts) -> None:
    """The reported bug: the 5.x layout was read as theta 10000 without scaling."""
    cfg = BackboneConfig.from_file(layouts("llama-llama3_rope")[1])
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192}
    assert cfg.torch_dtype == "bfloat16"


def test_sliding_window_variants_really_slide(layouts) -> None:
    """The sliding cases test a window: it changes these rewards."""
    for windowed, plain in (("qwen2-sliding_window", "qwen2"), ("mistral-sliding_window", "mistral")):
        assert BackboneConfig.from_file(layouts(windowed)[1]).sliding_window == 16
        name = CASES[plain][0]
        assert rewards(layouts(windowed)[1], name) != rewards(layouts(plain)[1], name)


# ----------------------------------------------------------------------------------------------
# Refused: what the backbones do not implement, in either layout
# ----------------------------------------------------------------------------------------------

SHAPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA_V5 = {**SHAPE, "model_type": "llama", "dtype": "bfloat16", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
QWEN2_V5 = {**LLAMA_V5, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": 2, "layer_types": ["full_attention", "full_attention"]}
MISTRAL_V4 = {**SHAPE, "model_type": "mistral", "torch_dtype": "bfloat16", "rope_theta": 10000.0, "sliding_window": 16}

REFUSED: dict[str, tuple[dict, str]] = {
    "rope_type yarn (5.x)": (
        {**LLAMA_V5, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        "rope_parameters.rope_type 'yarn' is not supported",
    ),
    "rope type dynamic (4.x)": (
        {**MISTRAL_V4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "rope_scaling.rope_type 'dynamic' is not supported",
    ),
    "partial rotary factor": (
        {**LLAMA_V5, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5}},
        r"rope_parameters of rope_type 'default' hold \['partial_rotary_factor'\]",
    ),
    "llama3 rope without its keys": (
        {**LLAMA_V5, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
        "lack .'high_freq_factor', 'low_freq_factor', 'original_max_position_embeddings'.",
    ),
    "rope per layer type": (
        {**QWEN2_V5, "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                         "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}},
        "rope_parameters .* differ by layer type",
    ),
    "layouts that disagree": (
        {**LLAMA_V5, "rope_theta": 500000.0},
        "rope_parameters .* disagree with its rope_theta/rope_scaling",
    ),
    "sliding window on some layers (5.x)": (
        {**QWEN2_V5, "use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]},
        r"layer_types put sliding-window attention on layers \[1\] only",
    ),
    "sliding window on some layers (4.x)": (
        {**QWEN2_V5, "layer_types": None, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        r"use_sliding_window/max_window_layers put sliding-window attention on layers \[1\] only",
    ),
    "an attention type the backbones lack": (
        {**QWEN2_V5, "layer_types": ["full_attention", "chunked_attention"]},
        r"layer_types holds \['chunked_attention'\]",
    ),
    "sliding layers on llama": (
        {**LLAMA_V5, "sliding_window": 16, "layer_types": ["sliding_attention", "sliding_attention"]},
        "Llama's backbone does not have",
    ),
    "sliding layers without an active window": (
        {**QWEN2_V5, "sliding_window": 16, "layer_types": ["sliding_attention", "sliding_attention"]},
        "sets no active sliding_window",
    ),
    "mistral with per-layer types": (
        {**MISTRAL_V4, "layer_types": ["full_attention", "sliding_attention"]},
        "Mistral's modeling code applies one window to every layer",
    ),
    "layer_types of the wrong length": (
        {**QWEN2_V5, "layer_types": ["full_attention"]},
        "1 entries for 2 layers",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_understood_is_refused_naming_the_field(case: str) -> None:
    config, message = REFUSED[case]
    with pytest.raises(CheckpointError, match=message):
        BackboneConfig.from_dict(config)


def test_a_refused_config_stops_the_load(layouts, tmp_path) -> None:
    v5 = layouts("llama-llama3_rope")[1]
    ckpt = with_config(v5, tmp_path / "yarn", rope_parameters={"rope_theta": 5e5, "rope_type": "yarn", "factor": 8.0})
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        PRM(str(ckpt), format="rlhflow", device="cpu", dtype="float32")


def test_either_layouts_dtype_is_read() -> None:
    assert BackboneConfig.from_dict(LLAMA_V5).torch_dtype == "bfloat16"
    assert BackboneConfig.from_dict(MISTRAL_V4 | {"torch_dtype": "float16"}).torch_dtype == "float16"
    # transformers reads `dtype` first when a config carries both
    assert BackboneConfig.from_dict(LLAMA_V5 | {"torch_dtype": "float16"}).torch_dtype == "bfloat16"


def test_a_rope_theta_outside_rope_parameters_is_read_as_transformers_reads_it() -> None:
    config = {**SHAPE, "model_type": "llama", "rope_parameters": {"rope_type": "default"}, "rope_theta": 500000.0}
    assert BackboneConfig.from_dict(config).rope_theta == 500000.0
