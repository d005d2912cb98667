"""Node extension with the real Qwen2 BPE: a child's ids, built from the node's ids and its new steps
alone, equal the whole item's tokenisation for every family that runs on a Qwen2 vocabulary."""

from __future__ import annotations

import pytest

from prmserve.formats import make_format
from prmserve.models.config import BackboneConfig
from prmserve.tokenizer import load_tokenizer
from real_tokenizers import write_real_qwen2_tokenizer

CONFIG = BackboneConfig.from_dict({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8, "intermediate_size": 8,
                                   "num_hidden_layers": 1, "num_attention_heads": 1})
CASES = {  # format, options
    "qwen_prm": ("qwen_prm", {}),
    "skywork_prm": ("skywork_prm", {}),
    "openr_math_psa": ("math_shepherd", {"preset": "openr"}),
    "math_shepherd_tag": ("math_shepherd", {}),
    "llemma_tag": ("llemma", {}),
}
PROBLEM = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast. How many remain?"
NODE = ["Janet starts with 16 eggs.", "She eats 3, so 16 - 3 = <<16-3=13>>13 remain."]
CHILDREN = [
    ["So the answer is 13."],
    [" She sells them at $2: 13 * 2 = $26.", "#### 26"],
    ["Let's check: 13 + 3 = 16 ✓", "Über-check: 答案 13."],
    ["Ending with spaces   ", "\tand a tab"],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_real_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2-real")))


@pytest.mark.parametrize("case", list(CASES))
def test_children_ids_equal_the_whole_items_with_the_real_qwen2_bpe(case: str, tokenizer) -> None:
    name, options = CASES[case]
    fmt = make_format(name, tokenizer, CONFIG, **options)
    one_line = name == "skywork_prm"
    for k in range(1, len(NODE) + 1):
        node = fmt.encode(PROBLEM, NODE[:k])
        children = [new for new in CHILDREN if not (one_line and any("\n" in s for s in new))]
        known = fmt.encode_boundaries(NODE[k - 1], children)  # all children's new text in one batch, as plan_extend does
        assert bool(known) == (fmt.boundary(NODE[k - 1], children[0]) is not None)
        for new in children:
            whole = fmt.encode(PROBLEM, NODE[:k] + new)
            assert fmt.extend(node, PROBLEM, NODE[:k], new) == whole
            assert fmt.extend(node, PROBLEM, NODE[:k], new, known) == whole
            fast = fmt.continuation(NODE[k - 1], new)
            if fast is not None:  # the fast path, when taken, is exact too
                ids, offsets = fast
                assert node.token_ids[: node.body_len] + ids + node.tail == whole.token_ids
