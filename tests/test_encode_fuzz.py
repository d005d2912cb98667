"""Whatever a caller puts in an item, `PRM.encode` gives an encoding or a typed prmserve error, for every family."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prmserve import PRM
from prmserve.errors import PRMServeError
from tiny_checkpoints import FORMAT_OF, build

FAMILIES = ["qwen_prm", "skywork_prm", "math_shepherd", "math_shepherd_openr", "rlhflow", "llemma", "outcome_qwen",
            "token_classification_qwen2"]
OPTIONS = {"math_shepherd_openr": {"preset": "openr"}}

texts = st.text(alphabet=st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", " ", "\n\n", "<extra_0>", "ки", "\n\n\n\n\n", "<|im_end|>", "\ud800", "+", "x" * 200])
values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True) | texts,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
items = st.one_of(
    st.fixed_dictionaries({"problem": values, "steps": values}),
    st.fixed_dictionaries({"problem": values, "steps": st.lists(texts, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"problem": texts, "completion": values}),
    st.fixed_dictionaries({"problem": texts, "completion": texts, "step_split": values}),
    st.fixed_dictionaries({"messages": values}),
    st.fixed_dictionaries({"text": values}),
    st.fixed_dictionaries({"token_ids": st.lists(st.integers(-3, 10**6), max_size=8) | values}),
    st.dictionaries(texts, values, max_size=4),
    values,
)


@pytest.fixture(scope="module")
def prms(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    made = {name: PRM(str(build(name, root / name)), format=FORMAT_OF[name], device="cpu", **OPTIONS.get(name, {}))
            for name in FAMILIES}
    yield made
    for prm in made.values():
        prm.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_any_item_is_encoded_or_refused_with_a_typed_error(name: str, prms) -> None:
    prm = prms[name]
    outcomes = {"encoded": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(item=items)
    def check(item) -> None:
        try:
            encoded = prm.encode(item)
        except PRMServeError:
            outcomes["refused"] += 1
            return
        outcomes["encoded"] += 1
        assert encoded.read_positions and all(0 <= p < len(encoded.token_ids) for p in encoded.read_positions)

    check()
    assert outcomes["encoded"] > 0 and outcomes["refused"] > 0, outcomes  # both paths were exercised
