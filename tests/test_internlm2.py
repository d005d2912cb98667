"""InternLM2 reward models (InternLM2ForRewardModel): packed wqkv unpacked at load onto the Llama-style backbone.

transformers has no InternLM2 class, so the reference is transformers' LlamaForSequenceClassification
holding the same tiny weights, converted by `reference.internlm2_to_llama` (written from InternLM's
`InternLM2Attention`, apart from the loader's unpacking). The input is the card's `get_score`: the chat
encoded with special tokens, then the config's `reward_token_id`; the score is `v_head` at that token.
Until the outcome format appends the reward token, the card's ids go through the engine as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prmserve.models.loader as loader
from prmserve import PRM
from prmserve.engine import Engine, EngineConfig, Request
from prmserve.errors import CheckpointError
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.loader import load_reward_model
from reference import internlm2_card_input, internlm2_rewards
from tiny_checkpoints import build_internlm2_reward, with_config

FP32_TOLERANCE = 1e-5
HEAD = HeadSpec("linear", "v_head", out_features=1, bias=False)  # the outcome format's head for InternLM2ForRewardModel
ITEMS = [
    (
        "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4. How many are left?",
        ["Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.", "Step 2: She bakes with 4, so 13 - 4 = 9.", "The answer is: 9"],
    ),
    ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."]),
    ("Résoudre x² = 4. 求解。", ["x = 2 ou x = −2 ✓", "所以答案是 2 🎉"]),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_internlm2_reward(tmp_path_factory.mktemp("internlm2") / "internlm2_reward")


def engine_scores(ckpt: Path, inputs: list[list[int]]) -> list[float]:
    """The loaded model run by prmserve's engine (prefix cache on), the head's output at each input's last token."""
    cfg = BackboneConfig.from_file(ckpt)
    model = load_reward_model(ckpt, cfg, HEAD, torch.device("cpu"), torch.float32)
    engine = Engine(model, EngineConfig())
    requests = [Request(f"r{i}", ids, [len(ids) - 1]) for i, ids in enumerate(inputs)]
    for request in requests:
        engine.add(request)
    while engine.has_unfinished():
        engine.step()
    return [float(r.outputs[0, 0]) for r in requests]


def test_config_reads_internlm2(ckpt: Path) -> None:
    cfg = BackboneConfig.from_file(ckpt)
    assert (cfg.model_type, cfg.attention_bias, cfg.qk_norm, cfg.rope_theta) == ("internlm2", False, False, 1000000.0)
    assert cfg.head_dim == cfg.hidden_size // cfg.num_heads and cfg.num_kv_heads < cfg.num_heads


def test_rewards_match_the_llama_conversion(ckpt: Path) -> None:
    inputs = [internlm2_card_input(str(ckpt), p, s) for p, s in ITEMS]
    got = engine_scores(ckpt, inputs)
    want = [internlm2_rewards(str(ckpt), p, s, torch.float32)[0] for p, s in ITEMS]
    error = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


def test_the_card_input_ends_in_the_reward_token(ckpt: Path) -> None:
    reward_token_id = json.loads((ckpt / "config.json").read_text())["reward_token_id"]
    ids = internlm2_card_input(str(ckpt), *ITEMS[0])
    assert ids[-1] == reward_token_id and ids.count(reward_token_id) == 1


def test_the_packing_order_matters(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading wqkv as plain [q; k; v] gives other rewards, in the reference and in the loader alike."""
    problem, steps = ITEMS[0]
    right = internlm2_rewards(str(ckpt), problem, steps, torch.float32)[0]
    wrong = internlm2_rewards(str(ckpt), problem, steps, torch.float32, packing="concatenated")[0]
    assert abs(right - wrong) > 1e-3
    ids = internlm2_card_input(str(ckpt), problem, steps)
    monkeypatch.setattr(loader, "unpack_internlm2_wqkv", lambda wqkv, cfg: wqkv)
    naive = engine_scores(ckpt, [ids])[0]
    assert abs(naive - wrong) <= FP32_TOLERANCE and abs(naive - right) > 1e-3


def test_unpacking_is_grouped_per_kv_head() -> None:
    """Rows tagged by (kv head, slot): queries come out in head order, then the keys, then the values."""
    cfg = BackboneConfig.from_dict({
        "model_type": "internlm2", "bias": False, "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    })
    d = cfg.head_dim  # 2; groups 2: per kv head [q, q, k, v]
    tags = [(h, slot) for h in range(2) for slot in range(4) for _ in range(d)]
    wqkv = torch.tensor([[10.0 * h + slot] * 8 for h, slot in tags])
    rows = loader.unpack_internlm2_wqkv(wqkv, cfg)[:, 0].tolist()
    assert rows == [0, 0, 1, 1, 10, 10, 11, 11] + [2, 2, 12, 12] + [3, 3, 13, 13]


def test_biases_are_refused(ckpt: Path, tmp_path: Path) -> None:
    biased = with_config(ckpt, tmp_path / "biased", bias=True)
    with pytest.raises(CheckpointError, match="bias"):
        BackboneConfig.from_file(biased)


def test_a_wrongly_shaped_wqkv_is_named(ckpt: Path, tmp_path: Path) -> None:
    fewer_kv = with_config(ckpt, tmp_path / "fewer_kv", num_key_value_heads=1)
    with pytest.raises(CheckpointError, match="attention.wqkv.weight"):
        load_reward_model(fewer_kv, BackboneConfig.from_file(fewer_kv), HEAD, torch.device("cpu"), torch.float32)


def test_problem_and_steps_score_as_the_card(ckpt: Path) -> None:
    """The outcome format, detected from InternLM2ForRewardModel, builds the card's input and reads v_head there."""
    prm = PRM(str(ckpt), device="cpu")
    try:
        assert prm.format_name == "outcome"
        for problem, steps in ITEMS:
            assert prm.encode({"problem": problem, "steps": steps}).token_ids == internlm2_card_input(str(ckpt), problem, steps)
        got = [r.step_rewards[0] for r in prm.score([{"problem": p, "steps": s} for p, s in ITEMS])]
    finally:
        prm.close()
    want = [internlm2_rewards(str(ckpt), p, s, torch.float32)[0] for p, s in ITEMS]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= FP32_TOLERANCE
