"""prmserve's step rewards against the independent transformers reference, for every PRM family layout."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from prmserve import PRM
from prmserve.errors import FormatError, InvalidInputError
from reference import reference_step_rewards
from tiny_checkpoints import BUILDERS, FORMAT_OF

FP32_TOLERANCE = 1e-5

# bf16 keeps 8 significant bits. prmserve and the reference both run every layer in bf16 but round in
# different places (fused vs unfused attention, accumulation order), and the layers after each
# rounding amplify it. Measured on these items: rerunning the reference itself with eager instead of
# SDPA attention moves its rewards by up to 0.0032 (about 2^-8), and prmserve sits 0.0029 from it.
# 2^-6 (0.0156, 4 bf16 ulps near 1) leaves room for that honest rounding noise and still catches a
# wrong input: dropping or changing the system prompt moves these bf16 rewards by 0.06 to 0.09.
BF16_TOLERANCE = 2.0**-6

OPENR = {"preset": "openr"}

# (checkpoint, prmserve/reference options) for every family and variant.
CASES: dict[str, tuple[str, dict]] = {
    "qwen_prm": ("qwen_prm", {}),
    "qwen_prm-no_system": ("qwen_prm", {"system_prompt": None}),
    "qwen_prm-custom_system": ("qwen_prm", {"system_prompt": "You grade math solutions."}),
    "qwen_prm-jinja_template": ("qwen_prm_jinja", {}),
    "qwen_prm-jinja_template-no_system": ("qwen_prm_jinja", {"system_prompt": None}),
    "skywork_prm": ("skywork_prm", {}),
    "math_shepherd": ("math_shepherd", {}),
    "math_shepherd-openr_qwen": ("math_shepherd_openr", OPENR),
    "rlhflow": ("rlhflow", {}),
    "llemma": ("llemma", {}),
    "outcome-qwen2_rm": ("outcome_qwen", {}),
    "outcome-llama_seq_cls": ("outcome_llama", {}),
}

MULTI_STEP = (
    "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4. "
    "She sells the rest at $2 each. How much does she make every day?",
    [
        "Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.",
        "Step 2: She bakes with 4, so 13 - 4 = 9 eggs remain.",
        "Step 3: She sells 9 eggs at $2 each: 9 \\times 2 = 18.",
        "The answer is: 18",
    ],
)
SINGLE_STEP = ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."])
UNICODE = (
    "Résoudre x² + 2x = 3 pour x ∈ ℝ. 求解。",
    ["On factorise : (x + 3)(x − 1) = 0 ✓", "Donc x = 1 ou x = −3. 所以答案是 1 🎉"],
)
INNER_NEWLINES = (
    "Compute 12 + 30.",
    ["First add the tens:\n10 + 30 = 40", "Then the ones:\n40 + 2 = 42\nThe answer is 42"],
)
# A search tree's siblings and a deeper node: same problem, shared leading steps, scored in one batch.
SHARED_PREFIX = [
    (MULTI_STEP[0], MULTI_STEP[1][:2]),
    (MULTI_STEP[0], MULTI_STEP[1][:2] + ["Step 3: She sells 9 eggs at $3 each: 27."]),
    MULTI_STEP,
]

ITEMS = [MULTI_STEP, SINGLE_STEP, UNICODE, INNER_NEWLINES, *SHARED_PREFIX]
# Skywork splits the response on "\n": a step is one line there.
ONE_LINE_ITEMS = [item for item in ITEMS if not any("\n" in step for step in item[1])]


@pytest.fixture(scope="session")
def served(checkpoint: Callable[[str], Path]) -> Iterator[Callable[..., PRM]]:
    """One prmserve `PRM` per (checkpoint, dtype, options), closed at the end of the session."""
    prms: dict[str, PRM] = {}

    def get(name: str, dtype: str = "float32", **options: object) -> PRM:
        key = json.dumps([name, dtype, options], sort_keys=True)
        if key not in prms:
            prms[key] = PRM(str(checkpoint(name)), format=FORMAT_OF[name], device="cpu", dtype=dtype, **options)
        return prms[key]

    yield get
    for prm in prms.values():
        prm.close()


def items_for(name: str) -> list[tuple[str, list[str]]]:
    """The test items legal for a checkpoint's format."""
    return ONE_LINE_ITEMS if FORMAT_OF[name] == "skywork_prm" else ITEMS


def score(prm: PRM, items: list[tuple[str, list[str]]]) -> list[list[float]]:
    """prmserve's rewards for items scored together in one call."""
    return [r.step_rewards for r in prm.score([{"problem": p, "steps": s} for p, s in items])]


def reference(name: str, ckpt: Path, items: list, dtype: torch.dtype = torch.float32, **options) -> list[list[float]]:
    """The reference's rewards for each item."""
    return [reference_step_rewards(FORMAT_OF[name], ckpt, p, s, dtype=dtype, **options) for p, s in items]


def worst_error(got: list[list[float]], want: list[list[float]]) -> float:
    """Largest absolute difference over all rewards, after checking every item has the right count."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w), f"item {i}: prmserve gave {len(g)} rewards, the reference {len(w)}"
    return max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))


@pytest.mark.parametrize("case", list(CASES))
def test_rewards_match_reference(case: str, checkpoint, served) -> None:
    """Every family gives its reference's rewards (float32, 1e-5), one per step (one per item for outcome)."""
    name, options = CASES[case]
    items = items_for(name)
    want = reference(name, checkpoint(name), items, **options)
    got = score(served(name, **options), items)
    expected_counts = [1 if FORMAT_OF[name] == "outcome" else len(steps) for _, steps in items]
    assert [len(w) for w in want] == expected_counts
    error = worst_error(got, want)
    assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


@pytest.mark.parametrize("case", ["qwen_prm", "skywork_prm", "math_shepherd", "rlhflow", "outcome-qwen2_rm"])
def test_batching_does_not_change_rewards(case: str, served) -> None:
    """An item scored alone gets the same rewards as inside a batch sharing its prefix."""
    name, options = CASES[case]
    prm = served(name, **options)
    items = items_for(name)
    together = score(prm, items)
    alone = [score(prm, [item])[0] for item in items]
    assert worst_error(together, alone) <= FP32_TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_batch_encoding_equals_one_by_one(case: str, served) -> None:
    """`encode_many` (one tokenizer call for all items, where the format renders one text) gives each item
    `encode`'s ids, and a bad item its own error in its place; `PRM.plan_score` names that item."""
    name, options = CASES[case]
    prm = served(name, **options)
    items = [*items_for(name), ("What is 1 + 1?", ["fine", "   "]), (MULTI_STEP[0], [])]
    got = prm.format.encode_many(items)
    for (problem, steps), encoded in zip(items, got):
        if steps and steps[-1].strip():
            assert encoded == prm.format.encode(problem, steps)
        else:
            assert isinstance(encoded, InvalidInputError)
    prm.recent.clear()
    with pytest.raises(InvalidInputError, match=f"^item {len(items) - 2}: step 1 is empty"):
        prm.plan_score([{"problem": p, "steps": s} for p, s in items])
    # The good items are recent now: their extensions by different new steps tokenise those steps in one batch.
    grown = [(p, [*s, f"Then {k} more steps follow."]) for k, (p, s) in enumerate(items[:-2])]
    jobs = prm.plan_score([{"problem": p, "steps": s} for p, s in grown])
    assert [job.encoded for job in jobs] == [prm.format.encode(p, s) for p, s in grown]


def test_rlhflow_strips_steps(checkpoint, served) -> None:
    """RLHFlow's code strips every step before building the chat, so padding around a step changes nothing."""
    padded = ("Compute 2 + 2.", ["  2 + 2 = 4  ", "\tThe answer is 4\n"])
    want = reference("rlhflow", checkpoint("rlhflow"), [padded])
    assert want == reference("rlhflow", checkpoint("rlhflow"), [(padded[0], [s.strip() for s in padded[1]])])
    error = worst_error(score(served("rlhflow"), [padded]), want)
    assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}"


def test_qwen_prm_system_prompt_changes_rewards(checkpoint) -> None:
    """The three system-prompt settings really differ, so the cases above test three inputs, not one."""
    ckpt = checkpoint("qwen_prm_jinja")
    problem, steps = MULTI_STEP
    default = reference_step_rewards("qwen_prm", ckpt, problem, steps)
    dropped = reference_step_rewards("qwen_prm", ckpt, problem, steps, system_prompt=None)
    custom = reference_step_rewards("qwen_prm", ckpt, problem, steps, system_prompt="You grade math solutions.")
    assert max(abs(a - b) for a, b in zip(default, dropped)) > 1e-3
    assert max(abs(a - b) for a, b in zip(default, custom)) > 1e-3


def test_qwen_prm_bfloat16(checkpoint, served) -> None:
    """bf16 rewards are bf16 numbers (the card rounds probabilities to bf16) and near the bf16 reference."""
    items = ITEMS
    want = reference("qwen_prm", checkpoint("qwen_prm"), items, dtype=torch.bfloat16)
    got = score(served("qwen_prm", dtype="bfloat16"), items)
    for rewards in got:
        for r in rewards:
            assert torch.tensor(r).to(torch.bfloat16).item() == r, f"{r!r} is not a bfloat16 value"
    error = worst_error(got, want)
    assert error <= BF16_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("qwen_prm", "qwen_prm"),
        ("skywork_prm", "skywork_prm"),
        ("outcome_qwen", "outcome"),
        ("outcome_llama", "outcome"),
    ],
)
def test_format_is_detected(name: str, family: str, checkpoint) -> None:
    """`PRM(dir)` without `format=` picks the family named by the architecture and scores like its reference."""
    ckpt = checkpoint(name)
    prm = PRM(str(ckpt), device="cpu", dtype="float32")
    try:
        got = score(prm, [MULTI_STEP])
    finally:
        prm.close()
    want = [reference_step_rewards(family, ckpt, *MULTI_STEP)]
    assert worst_error(got, want) <= FP32_TOLERANCE


@pytest.mark.parametrize("name", ["math_shepherd", "math_shepherd_openr", "rlhflow", "llemma"])
def test_causal_lm_needs_format(name: str, checkpoint) -> None:
    """A plain *ForCausalLM could be any step-tag family: prmserve asks for `format=` and lists the choices."""
    with pytest.raises(FormatError) as excinfo:
        PRM(str(checkpoint(name)), device="cpu", dtype="float32")
    for family in ("qwen_prm", "skywork_prm", "math_shepherd", "rlhflow", "llemma", "outcome"):
        assert family in str(excinfo.value)


# ----------------------------------------------------------------------------------------------
# The tiny checkpoints themselves: the harness is only as good as their likeness to the real ones.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_checkpoint_files_are_consistent(name: str, checkpoint) -> None:
    """Configs name a real architecture; safetensors indexes list exactly the tensors their shards hold."""
    ckpt = checkpoint(name)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] in ("qwen2", "qwen3", "llama", "mistral")
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    index_path = ckpt / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) == 2
        for shard in shards:
            with safe_open(str(ckpt / shard), framework="pt") as handle:
                assert set(handle.keys()) == {k for k, v in weight_map.items() if v == shard}


SPECIALS = {
    "qwen_prm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"],
    "skywork_prm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "rlhflow": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "math_shepherd": ["<s>", "</s>", "<unk>"],
}


@pytest.mark.parametrize("name", list(SPECIALS))
def test_special_tokens_are_single_ids(name: str, checkpoint) -> None:
    """Each family's special tokens encode to one id, as in the released tokenizers."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint(name))
    for special in SPECIALS[name]:
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special


def test_step_tag_tokens_match_the_cards(checkpoint) -> None:
    """The cards' token lookups give single ids: Math-Shepherd's ки + -, OpenR's tag, Llama's BOS."""
    shepherd = AutoTokenizer.from_pretrained(checkpoint("math_shepherd"))
    assert shepherd.encode("ки")[0] == shepherd.bos_token_id
    assert shepherd.encode("ки")[-1] == shepherd.encode(" ки")[-1]
    good_bad = shepherd.encode("+ -")[1:]
    assert good_bad == [shepherd.encode("+")[-1], shepherd.encode("-")[-1]]
    openr = AutoTokenizer.from_pretrained(checkpoint("math_shepherd_openr"))
    assert len(openr.encode(" \n\n\n\n\n")) == 1
    assert len(openr.encode(" + -")) == 2
    skywork = AutoTokenizer.from_pretrained(checkpoint("skywork_prm"))
    assert skywork.bos_token == "<|endoftext|>"
    assert skywork.encode(skywork.bos_token + "x")[0] == skywork.convert_tokens_to_ids("<|endoftext|>")
