"""Token-classification PRMs (TRL's PRMTrainer output) against transformers' *ForTokenClassification and TRL's tokenize_row."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from prmserve import PRM
from prmserve.errors import FormatError, InvalidInputError
from reference import reference_step_rewards, tokenizer_of, trl_prm_input
from tiny_checkpoints import with_config

FP32_TOLERANCE = 1e-5
PURE = {"step_separator": "\n\n", "reward": "p1_minus_p0"}

# (checkpoint, options): both backbones (Qwen2 without BOS, Llama 3 with BOS), both separators, both rewards.
CASES: dict[str, tuple[str, dict]] = {
    "qwen2": ("token_classification_qwen2", {}),
    "qwen2-pure": ("token_classification_qwen2", PURE),
    "qwen2-blank_line-p1": ("token_classification_qwen2", {"step_separator": "\n\n"}),
    "qwen2-newline-p1_minus_p0": ("token_classification_qwen2", {"reward": "p1_minus_p0"}),
    "llama": ("token_classification_llama", {}),
    "llama-pure": ("token_classification_llama", PURE),
}

MULTI_STEP = (
    "Janet's ducks lay 16 eggs per day.\nShe eats 3 for breakfast and bakes muffins with 4. How much is left?",
    [
        "Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.",
        "Step 2: She bakes with 4, so 13 - 4 = 9 eggs remain.",
        "The answer is: 9",
    ],
)
SINGLE_STEP = ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."])
UNICODE = ("Résoudre x² + 2x = 3 pour x ∈ ℝ. 求解。", ["On factorise : (x + 3)(x − 1) = 0 ✓", "Donc x = 1. 所以答案是 1 🎉"])
# Steps that begin with spaces or end in a newline: tokenised alone, so nothing merges with the separator.
EDGES = ("Compute 12 + 30.", ["  First the tens: 10 + 30 = 40 ", " then 40 + 2 = 42."])
INNER_NEWLINES = ("Compute 12 + 30.", ["First add the tens:\n10 + 30 = 40", "Then the ones:\n40 + 2 = 42"])
ITEMS = [MULTI_STEP, SINGLE_STEP, UNICODE, EDGES]


@pytest.fixture(scope="module")
def served(checkpoint) -> Iterator[Callable[..., PRM]]:
    prms: dict[str, PRM] = {}

    def get(name: str, **options: object) -> PRM:
        key = json.dumps([name, options], sort_keys=True)
        if key not in prms:
            prms[key] = PRM(str(checkpoint(name)), format="token_classification", device="cpu", dtype="float32", **options)
        return prms[key]

    yield get
    for prm in prms.values():
        prm.close()


def items_for(options: dict) -> list[tuple[str, list[str]]]:
    """Steps with inner newlines are legal where the separator is a blank line."""
    return ITEMS + ([INNER_NEWLINES] if options.get("step_separator") == "\n\n" else [])


def worst_error(got: list[list[float]], want: list[list[float]]) -> float:
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
    return max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))


@pytest.mark.parametrize("case", list(CASES))
def test_rewards_match_transformers_token_classification(case: str, checkpoint, served) -> None:
    name, options = CASES[case]
    items = items_for(options)
    want = [reference_step_rewards("token_classification", checkpoint(name), p, s, **options) for p, s in items]
    got = [r.step_rewards for r in served(name, **options).score([{"problem": p, "steps": s} for p, s in items])]
    error = worst_error(got, want)
    assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


@pytest.mark.parametrize("case", list(CASES))
def test_ids_are_trl_tokenize_rows(case: str, checkpoint, served) -> None:
    """The ids and read positions are exactly TRL's: BOS if the tokenizer has one, prompt, each step + separator;
    item by item and with a call's pieces tokenised in one batch (`encode_many`)."""
    name, options = CASES[case]
    tokenizer = tokenizer_of(str(checkpoint(name)))
    prm = served(name, **options)
    items = items_for(options)
    batched = prm.format.encode_many(items)
    for (problem, steps), together in zip(items, batched, strict=True):
        encoded = prm.encode({"problem": problem, "steps": steps})
        ids, positions = trl_prm_input(tokenizer, problem, steps, options.get("step_separator", "\n"))
        assert (encoded.token_ids, encoded.read_positions) == (ids, positions)
        assert (together.token_ids, together.read_positions) == (ids, positions)
        assert (ids[0] == tokenizer.bos_token_id) == (tokenizer.bos_token_id is not None)


def test_the_separators_and_rewards_really_differ(checkpoint) -> None:
    """The cases above test four different inputs and formulas, not one."""
    ckpt = checkpoint("token_classification_qwen2")
    problem, steps = MULTI_STEP
    newline = reference_step_rewards("token_classification", ckpt, problem, steps)
    blank = reference_step_rewards("token_classification", ckpt, problem, steps, step_separator="\n\n")
    assert max(abs(a - b) for a, b in zip(newline, blank)) > 1e-3
    diff = reference_step_rewards("token_classification", ckpt, problem, steps, reward="p1_minus_p0")
    assert max(abs(2 * p - 1 - d) for p, d in zip(newline, diff)) < 1e-6


@pytest.mark.parametrize("name", ["token_classification_qwen2", "token_classification_llama"])
def test_format_is_detected(name: str, checkpoint) -> None:
    prm = PRM(str(checkpoint(name)), device="cpu", dtype="float32")
    try:
        assert prm.format_name == "token_classification"
        got = prm.score([{"problem": MULTI_STEP[0], "steps": MULTI_STEP[1]}])[0].step_rewards
    finally:
        prm.close()
    want = reference_step_rewards("token_classification", checkpoint(name), *MULTI_STEP)
    assert worst_error([got], [want]) <= FP32_TOLERANCE


def test_other_label_counts_are_not_detected_and_refused(checkpoint, tmp_path) -> None:
    three = with_config(checkpoint("token_classification_qwen2"), tmp_path / "three", id2label={"0": "a", "1": "b", "2": "c"})
    with pytest.raises(FormatError, match="pass format="):
        PRM(str(three), device="cpu")
    with pytest.raises(FormatError, match="reads two labels; this model has 3"):
        PRM(str(three), format="token_classification", device="cpu")


def test_bad_options_and_inputs_are_refused(served) -> None:
    with pytest.raises(FormatError, match="no reward 'p0'"):
        served("token_classification_qwen2", reward="p0")
    with pytest.raises(FormatError, match="non-empty string"):
        served("token_classification_qwen2", step_separator="")
    prm = served("token_classification_qwen2")
    with pytest.raises(InvalidInputError, match="step 1 contains '\\\\n'"):
        prm.score([{"problem": "p", "steps": ["a", "b\nc"]}])
    with pytest.raises(FormatError, match="needs problem and steps"):
        prm.score([{"text": "p a\nb\n"}])
