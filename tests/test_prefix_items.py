"""Formats that score each step prefix as its own sequence (Universal-PRM): `PRM.score` sends one request per
prefix, joins their rewards in step order, and the prefix cache computes the shared part once."""

from __future__ import annotations

import pytest

from prmserve import PRM
from prmserve.errors import FormatError
from tiny_checkpoints import build

PROBLEM = "Tom has 3 apples and buys 2 more. Then he doubles them. How many?"
STEPS = ["3 + 2 = 5 apples.", "5 * 2 = 10 apples.", "The answer is 10."]


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    made = PRM(str(build("universal_prm", tmp_path_factory.mktemp("universal") / "u")), format="universal_prm", device="cpu")
    yield made
    made.close()


def test_every_prefix_is_scored_and_the_rewards_join_in_step_order(prm) -> None:
    whole = prm.score([{"problem": PROBLEM, "steps": STEPS}])[0]
    alone = [prm.score([{"token_ids": item.token_ids}])[0].step_rewards[0] for item in prm.format.prefixes(PROBLEM, STEPS)]
    assert len(whole.step_rewards) == len(STEPS)
    assert whole.step_rewards == pytest.approx(alone, abs=1e-6)
    lengths = [len(item.token_ids) for item in prm.format.prefixes(PROBLEM, STEPS)]
    assert whole.usage.prompt_tokens == sum(lengths)


def test_the_prefix_cache_makes_the_prefixes_cost_about_one_pass(prm) -> None:
    prm.reset_prefix_cache()
    usage = prm.score([{"problem": PROBLEM + " (fresh)", "steps": STEPS}])[0].usage
    longest = len(prm.format.prefixes(PROBLEM + " (fresh)", STEPS)[-1].token_ids)
    # Shared full blocks are computed once: about the longest prefix plus a partial block per shorter prefix.
    assert usage.computed_tokens <= longest + 16 * (len(STEPS) - 1)
    assert usage.cached_tokens > 0


def test_completions_and_keep(prm) -> None:
    completion = "\n\n".join(STEPS)
    from_completion = prm.score([{"problem": PROBLEM, "completion": completion}])[0]
    assert len(from_completion.step_rewards) == len(STEPS) and from_completion.step_spans is not None
    with pytest.raises(FormatError, match="cannot keep nodes"):
        prm.score([{"problem": PROBLEM, "steps": STEPS}], keep=True)
