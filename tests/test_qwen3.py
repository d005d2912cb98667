"""The Qwen3 backbone (per-head q/k RMSNorm before rotary, no biases, its own head_dim) against transformers' Qwen3 code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prmserve import PRM
from prmserve.errors import CheckpointError
from prmserve.models.config import BackboneConfig
from reference import reference_step_rewards
from tiny_checkpoints import FORMAT_OF, QWEN3_HEAD_DIM, with_config

FP32_TOLERANCE = 1e-5
PURE = {"step_separator": "\n\n", "reward": "p1_minus_p0"}
ITEMS = [
    (
        "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4. How many are left?",
        ["Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.", "Step 2: She bakes with 4, so 13 - 4 = 9.", "The answer is: 9"],
    ),
    ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."]),
    ("Résoudre x² = 4. 求解。", ["x = 2 ou x = −2 ✓", "所以答案是 2 🎉"]),
]
# (checkpoint, format options, config.json keys changed)
CASES: dict[str, tuple[str, dict, dict]] = {
    "outcome": ("outcome_qwen3", {}, {}),
    "token_classification": ("token_classification_qwen3", {}, {}),
    "token_classification-pure": ("token_classification_qwen3", PURE, {}),
    "sliding_window": (
        "token_classification_qwen3",
        {},
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0, "layer_types": ["sliding_attention"] * 2},
    ),
}


def rewards(ckpt: Path, name: str, **options: object) -> list[list[float]]:
    prm = PRM(str(ckpt), format=FORMAT_OF[name], device="cpu", dtype="float32", **options)
    try:
        return [r.step_rewards for r in prm.score([{"problem": p, "steps": s} for p, s in ITEMS])]
    finally:
        prm.close()


def worst_error(got: list[list[float]], want: list[list[float]]) -> float:
    return max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))


def as_transformers_4(source: Path, directory: Path) -> Path:
    """The same checkpoint with config.json in 4.x's layout: top-level rope_theta, torch_dtype, no layer_types."""
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    layout = {k: v for k, v in config.items() if k not in ("dtype", "layer_types")}
    copy = with_config(source, directory)
    (copy / "config.json").write_text(json.dumps({**layout, "rope_theta": rope["rope_theta"], "torch_dtype": config["dtype"]}))
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_rewards_match_transformers_qwen3(case: str, checkpoint, tmp_path) -> None:
    name, options, changes = CASES[case]
    ckpt = with_config(checkpoint(name), tmp_path / case, **changes) if changes else checkpoint(name)
    want = [reference_step_rewards(FORMAT_OF[name], ckpt, p, s, **options) for p, s in ITEMS]
    got = rewards(ckpt, name, **options)
    error = worst_error(got, want)
    assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


def test_the_sliding_window_changes_the_rewards(checkpoint, tmp_path) -> None:
    """The sliding-window case above tests another attention, not the full one again."""
    name, _, changes = CASES["sliding_window"]
    windowed = with_config(checkpoint(name), tmp_path / "windowed", **changes)
    assert worst_error(rewards(windowed, name), rewards(checkpoint(name), name)) > 1e-4


@pytest.mark.parametrize("name", ["outcome_qwen3", "token_classification_qwen3"])
def test_both_config_layouts_give_the_same_backbone_and_rewards(name: str, checkpoint, tmp_path) -> None:
    v5 = checkpoint(name)
    v4 = as_transformers_4(v5, tmp_path / "v4")
    assert "rope_parameters" in json.loads((v5 / "config.json").read_text())
    assert BackboneConfig.from_file(v4) == BackboneConfig.from_file(v5)
    assert rewards(v4, name) == rewards(v5, name)


def test_config_reads_qwen3_head_dim_and_qk_norm(checkpoint) -> None:
    cfg = BackboneConfig.from_file(checkpoint("outcome_qwen3"))
    assert (cfg.model_type, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == ("qwen3", QWEN3_HEAD_DIM, True, False)
    assert cfg.head_dim != cfg.hidden_size // cfg.num_heads
    raw = json.loads((checkpoint("outcome_qwen3") / "config.json").read_text())
    del raw["head_dim"]
    assert BackboneConfig.from_dict(raw).head_dim == 128  # Qwen3Config's default, not hidden / heads


def test_formats_are_detected(checkpoint) -> None:
    for name, family in [("outcome_qwen3", "outcome"), ("token_classification_qwen3", "token_classification")]:
        prm = PRM(str(checkpoint(name)), device="cpu", dtype="float32")
        try:
            assert prm.format_name == family
        finally:
            prm.close()


def test_attention_bias_is_refused(checkpoint, tmp_path) -> None:
    biased = with_config(checkpoint("outcome_qwen3"), tmp_path / "biased", attention_bias=True)
    with pytest.raises(CheckpointError, match="attention_bias"):
        PRM(str(biased), device="cpu")


def test_missing_qk_norm_tensors_are_named(checkpoint, tmp_path) -> None:
    """A Qwen2-style checkpoint that calls itself qwen3 lacks q_norm/k_norm: the loader names them."""
    from safetensors.torch import load_file, save_file

    ckpt = with_config(checkpoint("outcome_qwen3"), tmp_path / "no_norms")
    for shard in ckpt.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(shard).items() if "q_norm" not in k and "k_norm" not in k}, str(shard))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "q_norm" not in k and "k_norm" not in k}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="self_attn.k_norm.weight"):
        PRM(str(ckpt), device="cpu")
