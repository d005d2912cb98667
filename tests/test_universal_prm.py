"""AURORA Universal-PRM-7B: one sequence per step prefix (the card's template), against transformers' Qwen2ForSequenceClassification.

Until `PRM` scores a format's several prefixes per item, the prefixes go through the engine as
pre-tokenised items (`{"token_ids": ...}`), one per step, all in one call.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prmserve import PRM
from prmserve.errors import FormatError, InvalidInputError
from prmserve.results import TokenUsage
from reference import reference_step_rewards, tokenizer_of, universal_prm_prefixes
from tiny_checkpoints import build

FP32_TOLERANCE = 1e-5
REFERENCE = "16 - 3 - 4 = 9 eggs, sold at $2: 9 * 2 = 18.\n#### 18"

MULTI_STEP = (
    "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4. "
    "She sells the rest at $2 each. How much does she make every day?",
    [
        "Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.",
        "Step 2: She bakes with 4, so 13 - 4 = 9 eggs remain.\nThat leaves 9.",
        "Step 3: She sells 9 eggs at $2 each: 9 \\times 2 = 18.",
        "The answer is: 18",
    ],
)
SINGLE_STEP = ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."])
UNICODE = ("Résoudre x² + 2x = 3 pour x ∈ ℝ. 求解。", ["On factorise : (x + 3)(x − 1) = 0 ✓", " Donc x = 1. 所以答案是 1 🎉 "])
ITEMS = [MULTI_STEP, SINGLE_STEP, UNICODE]
# (format options): the card's "no reference" sentence, and a reference answer.
CASES = {"no_reference": {}, "reference_answer": {"reference_answer": REFERENCE}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("universal_prm", tmp_path_factory.mktemp("universal_prm") / "universal_prm")


@pytest.fixture(scope="module")
def served(ckpt: Path) -> Iterator[dict[str, PRM]]:
    prms = {case: PRM(str(ckpt), format="universal_prm", device="cpu", dtype="float32", **options) for case, options in CASES.items()}
    yield prms
    for prm in prms.values():
        prm.close()


def prefix_rewards(prm: PRM, problem: str, steps: list[str]) -> tuple[list[float], TokenUsage]:
    """Every prefix of the item through the engine in one call: (rewards in step order, total usage)."""
    results = prm.score([{"token_ids": item.token_ids} for item in prm.format.prefixes(problem, steps)])
    usage = TokenUsage()
    for r in results:
        assert len(r.step_rewards) == 1
        usage = usage + r.usage
    return [r.step_rewards[0] for r in results], usage


@pytest.mark.parametrize("case", list(CASES))
def test_prefix_ids_are_the_cards(case: str, ckpt: Path, served) -> None:
    """Each prefix's ids are the card's: template with generation prompt, tokenizer(steps joined + "\\n\\n"), EOS; read at the EOS."""
    tokenizer = tokenizer_of(str(ckpt))
    fmt = served[case].format
    for problem, steps in ITEMS:
        want = universal_prm_prefixes(tokenizer, problem, steps, CASES[case].get("reference_answer", ""))
        got = fmt.prefixes(problem, steps)
        assert [item.token_ids for item in got] == want
        assert all(item.read_positions == [len(item.token_ids) - 1] for item in got)
        assert all(item.token_ids[-1] == tokenizer.eos_token_id for item in got)


@pytest.mark.parametrize("case", list(CASES))
def test_rewards_match_transformers(case: str, ckpt: Path, served) -> None:
    options = CASES[case]
    for problem, steps in ITEMS:
        want = reference_step_rewards("universal_prm", ckpt, problem, steps, **options)
        got, _ = prefix_rewards(served[case], problem, steps)
        error = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert error <= FP32_TOLERANCE, f"max |prmserve - reference| = {error:.3g}\nprmserve  {got}\nreference {want}"


def test_a_single_step_item_is_scored_directly(ckpt: Path, served) -> None:
    problem, steps = SINGLE_STEP
    got = served["no_reference"].score([{"problem": problem, "steps": steps}])[0].step_rewards
    want = reference_step_rewards("universal_prm", ckpt, problem, steps)
    assert len(got) == 1 and abs(got[0] - want[0]) <= FP32_TOLERANCE


def test_problem_and_steps_items(ckpt: Path, served) -> None:
    """Where PRM scores a format's prefixes per item, a multi-step item gets the reference's rewards and its
    prefixes' usage; where it does not yet, the format refuses the item rather than score one sequence."""
    prm = served["no_reference"]
    items = [{"problem": p, "steps": s} for p, s in ITEMS]
    try:
        results = prm.score(items)
    except FormatError as exc:
        assert "one request per prefix" in str(exc)
        pytest.skip("this PRM does not score several prefixes per item yet")
    for (problem, steps), result in zip(ITEMS, results, strict=True):
        want = reference_step_rewards("universal_prm", ckpt, problem, steps)
        got, usage = prefix_rewards(prm, problem, steps)
        assert max(abs(a - b) for a, b in zip(result.step_rewards, want, strict=True)) <= FP32_TOLERANCE
        assert result.step_rewards == pytest.approx(got, abs=FP32_TOLERANCE)
        assert result.usage.prompt_tokens == usage.prompt_tokens


def test_the_reference_answer_changes_the_rewards(ckpt: Path) -> None:
    """The two cases test two inputs, not one."""
    without = reference_step_rewards("universal_prm", ckpt, *MULTI_STEP)
    with_reference = reference_step_rewards("universal_prm", ckpt, *MULTI_STEP, reference_answer=REFERENCE)
    assert max(abs(a - b) for a, b in zip(without, with_reference)) > 1e-3


def test_the_prefix_cache_makes_the_prefixes_cost_about_one_pass(ckpt: Path) -> None:
    """The prefixes share the query and the earlier steps: with the prefix cache the engine computes little
    more than the longest prefix, without it every prefix in full."""
    problem, steps = MULTI_STEP
    costs = {}
    for caching in (True, False):
        prm = PRM(str(ckpt), format="universal_prm", device="cpu", dtype="float32", enable_prefix_caching=caching)
        try:
            rewards, usage = prefix_rewards(prm, problem, steps)
            longest = len(prm.format.prefixes(problem, steps)[-1].token_ids)
            block = prm.engine.blocks.block_size
        finally:
            prm.close()
        costs[caching] = (usage, rewards)
    cached, uncached = costs[True][0], costs[False][0]
    assert costs[True][1] == pytest.approx(costs[False][1], abs=FP32_TOLERANCE)
    assert uncached.computed_tokens == uncached.prompt_tokens == cached.prompt_tokens
    # Each later prefix recomputes at most its own new step, the separator, the EOS and one partial block.
    assert cached.computed_tokens <= longest + (len(steps) - 1) * (block + 2)
    assert cached.computed_tokens < 0.6 * cached.prompt_tokens
    print(f"universal_prm prefixes of {len(steps)} steps: prompt {cached.prompt_tokens} tokens, computed "
          f"{cached.computed_tokens} with the prefix cache (longest prefix {longest}), {uncached.computed_tokens} without")


def test_bad_options_are_refused(ckpt: Path) -> None:
    with pytest.raises(FormatError, match="step_separator"):
        PRM(str(ckpt), format="universal_prm", device="cpu", step_separator="")
    with pytest.raises(FormatError, match="reference_answer"):
        PRM(str(ckpt), format="universal_prm", device="cpu", reference_answer=3)


def test_steps_with_the_separator_are_refused(served) -> None:
    with pytest.raises(InvalidInputError, match="separator"):
        served["no_reference"].format.prefixes("p", ["a\n\nb"])
