"""EurusPRM (implicit PRM): two tiny Qwen2 causal LMs in the real layout, scored by prmserve's implicit_prm format
and by the EurusPRM card's own code (written out below) on transformers' Qwen2ForCausalLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_checkpoints as tc
from prmserve import PRM
from prmserve.errors import CheckpointError, FormatError, InvalidInputError

FP32_TOLERANCE = 1e-5
CARD_COEF = 0.001
# The reference model's published template (tests/data/chat_templates): EurusPRM is fine-tuned from it.
QWEN_MATH_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "qwen2.5-math-7b-instruct.jinja").read_text()
# Steps ending in "." before "\n\n": the tokenizer below learns ".\n\n" as one token, as Qwen2.5's vocabulary has it,
# which moves the card's step ends by a token.
DOTTED = [f"Step {k}: {a} + {b} = {a + b}.\n\nStep {k + 1}: so {a + b} - {b} = {a}.\n\nThe answer is {a}." for k, a, b in
          [(1, 12, 7), (2, 30, 4), (3, 9, 9), (1, 44, 2)] * 25]
ITEMS = [
    ("Tom has 3 apples and buys 2 more. How many?", ["Step 1: 3 + 2 = 5.", "Step 2: He has 5 apples.", "The answer is 5"]),
    ("What is 7 + 8?", ["7 + 8 = 15, so the answer is $\\boxed{15}$."]),
    ("Janet has 16 eggs and eats 3. How many are left?", ["16 - 3 = 13", "So 13 eggs are left.", "#### 13"]),
    ("Résoudre x² = 4 pour x > 0.", ["x = √4 = 2 ✓", " Donc x = 2. 所以答案是 2 🎉 "]),
]


def build_eurus_pair(root: Path, **shape: int) -> tuple[Path, Path]:
    """EurusPRM-Stage2 and its reference Qwen2.5-Math-7B-Instruct at toy size: plain Qwen2ForCausalLM checkpoints
    (config.json, sharded safetensors with lm_head.weight), one shared Qwen2.5 tokenizer; the PRM's weights are the
    reference's plus a small change, as a fine-tune's are. `shape` overrides config.json's sizes."""
    policy, reference = root / "EurusPRM-Stage2", root / "Qwen2.5-Math-7B-Instruct"
    for directory in (policy, reference):
        directory.mkdir(parents=True)
    tokenizer = tc.write_qwen_tokenizer(reference, [], QWEN_MATH_TEMPLATE, extra_corpus=DOTTED)
    config = tc.qwen2_config("Qwen2ForCausalLM", tokenizer) | shape
    shapes = tc.backbone_tensor_shapes(config) | {"lm_head.weight": (tc.EMBED_ROWS, config["hidden_size"])}
    base = tc.random_weights(shapes, seed=21, dtype=torch.float32)
    tuned = {name: w + 0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(i))
             for i, (name, w) in enumerate(base.items())}
    for directory, weights in ((reference, base), (policy, tuned)):
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tc.save_sharded_safetensors(directory, {k: v.to(torch.bfloat16) for k, v in weights.items()}, shards=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(reference / name, policy / name)
    return policy, reference


def card_step_rewards(policy_dir: Path, reference_dir: Path, query: str, answer: list[str], coef: float = CARD_COEF) -> list[float]:
    """The EurusPRM card's usage code, step for step, in float32 on transformers' models."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    input_ids = tokenizer.apply_chat_template([
        {"role": "user", "content": query},
        {"role": "assistant", "content": "\n\n".join(answer)},
    ], tokenize=True, add_generation_prompt=False, return_tensors="pt")
    input_ids = input_ids["input_ids"] if hasattr(input_ids, "keys") else input_ids  # transformers 5 returns a BatchEncoding
    attention_mask = input_ids != tokenizer.pad_token_id
    step_last_tokens = []
    for step_num in range(0, len(answer) + 1):
        conv = tokenizer.apply_chat_template([
            {"role": "user", "content": query},
            {"role": "assistant", "content": "\n\n".join(answer[:step_num])},
        ], tokenize=False, add_generation_prompt=False)
        conv = conv.strip()
        if step_num != 0 and step_num != len(answer):
            conv += "\n\n"
        currect_ids = tokenizer.encode(conv, add_special_tokens=False)
        step_last_tokens.append(len(currect_ids) - 2)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
    label_mask = torch.tensor([[0] * step_last_tokens[0] + [1] * (input_ids.shape[-1] - step_last_tokens[0])])
    step_last_tokens = torch.tensor([step_last_tokens])

    def get_logps(model, inputs):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:].clone().long()
        logits = logits[:, :-1, :]
        labels[labels == -100] = 0
        return torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)

    with torch.no_grad():
        per_token_logps = get_logps(model, inputs)
        ref_per_token_logps = get_logps(ref_model, inputs)
    raw_reward = per_token_logps - ref_per_token_logps
    beta_reward = coef * raw_reward * label_mask[:, 1:]
    beta_reward = beta_reward.cumsum(-1)
    return beta_reward.gather(dim=-1, index=step_last_tokens[:, 1:]).tolist()[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_eurus_pair(tmp_path_factory.mktemp("eurus"))


@pytest.fixture(scope="module")
def prm(pair, single_torch_thread) -> Iterator[PRM]:
    policy, reference = pair
    served = PRM(str(policy), device="cpu", dtype="float32", reference_model=str(reference))
    yield served
    served.close()


@pytest.fixture(scope="module")
def expected(pair) -> list[list[float]]:
    return [card_step_rewards(*pair, problem, steps) for problem, steps in ITEMS]


def test_the_tokenizer_merges_a_dot_with_the_blank_line(pair) -> None:
    """The case where the card's step ends are one token past the step (".\\n\\n" is one token) is exercised."""
    tokenizer = AutoTokenizer.from_pretrained(pair[0])
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("5.\n\nStep", add_special_tokens=False)) == ["5", ".ĊĊ", "Step"]


def test_detected_by_name_and_both_models_share_one_kv_pool(prm: PRM) -> None:
    assert prm.format_name == "implicit_prm"
    layers = prm.engine.runner.kv_cache.shape[0]
    assert layers == 2 * tc.LAYERS and prm.engine.runner.head_cache.shape[1] == 1


def test_rewards_match_the_card(prm: PRM, expected) -> None:
    got = [r.step_rewards for r in prm.score([{"problem": p, "steps": s} for p, s in ITEMS])]
    for want, have in zip(expected, got):
        assert have == pytest.approx(want, abs=FP32_TOLERANCE, rel=0)
    spread = max(abs(r) for rewards in expected for r in rewards)
    assert spread > 1e-3  # the two models differ enough that a wrong sign or range would show


def test_chunked_and_cached_runs_give_the_same_rewards(pair, expected, single_torch_thread) -> None:
    """Chunks of 7 tokens (they start inside blocks and inside steps) and prefixes served from the cache (a shared
    problem, and the same items again) need each chunk's first token's predecessor: the rewards stay the card's."""
    policy, reference = pair
    small = PRM(str(policy), device="cpu", dtype="float32", reference_model=str(reference), max_num_batched_tokens=7)
    try:
        items = [{"problem": p, "steps": s} for p, s in ITEMS]
        first = small.score(items)
        again = small.score(items + [{"problem": ITEMS[0][0], "steps": ITEMS[0][1][:2] + ["So 5."]}])
    finally:
        small.close()
    for want, a, b in zip(expected, first, again):
        assert a.step_rewards == pytest.approx(want, abs=FP32_TOLERANCE, rel=0)
        assert b.step_rewards == pytest.approx(want, abs=FP32_TOLERANCE, rel=0)
        assert b.usage.cached_tokens > 0
    shared = card_step_rewards(policy, reference, ITEMS[0][0], ITEMS[0][1][:2] + ["So 5."])
    assert again[-1].step_rewards == pytest.approx(shared, abs=FP32_TOLERANCE, rel=0)


def test_extending_an_encoding_equals_encoding_the_whole_item(prm: PRM) -> None:
    fmt = prm.format
    for problem, steps in ITEMS + [("Sum?", DOTTED[0].split("\n\n"))]:
        for head in range(1, len(steps)):
            node = fmt.encode(problem, steps[:head])
            assert fmt.extend(node, problem, steps[:head], steps[head:]) == fmt.encode(problem, steps)


def test_extend_equals_scoring_the_whole_item(prm: PRM) -> None:
    problem, steps = ITEMS[0]
    node = prm.score([{"problem": problem, "steps": steps[:1]}], keep=True)[0]
    children = [["Step 2: 5 apples."], ["Step 2: He has 5 apples.", "The answer is 5"]]
    kids = prm.extend(node.handle, children, keep=True)
    whole = prm.score([{"problem": problem, "steps": steps[:1] + c} for c in children])
    for kid, full in zip(kids, whole):
        assert kid.step_rewards == pytest.approx(full.step_rewards, abs=1e-6, rel=0)
    # The node's own step ends at the end of its turn; in a child it runs into the next step: read again, not kept.
    assert kids[0].step_rewards[0] != pytest.approx(node.step_rewards[0], abs=1e-9)
    grandchild = prm.extend(kids[0].handle, [["The answer is 5"]])[0]
    full = prm.score([{"problem": problem, "steps": steps[:1] + children[0] + ["The answer is 5"]}])[0]
    assert grandchild.step_rewards == pytest.approx(full.step_rewards, abs=1e-6, rel=0)
    prm.release([node.handle, *(k.handle for k in kids)])


def test_per_step_rewards_and_beta(pair, prm: PRM, expected, single_torch_thread) -> None:
    policy, reference = pair
    problem, steps = ITEMS[0]
    other = PRM(str(policy), device="cpu", dtype="float32", reference_model=str(reference), reward="per_step", beta=0.01)
    try:
        got = other.score([{"problem": problem, "steps": steps}])[0].step_rewards
    finally:
        other.close()
    q = [10 * r for r in expected[0]]
    assert got == pytest.approx([q[0]] + [b - a for a, b in zip(q, q[1:])], abs=1e-4, rel=0)


def test_pre_formatted_input_and_bad_options_are_refused(pair, prm: PRM) -> None:
    with pytest.raises(FormatError, match="needs problem and steps"):
        prm.score([{"text": "<|im_start|>user\nhi<|im_end|>"}])
    with pytest.raises(InvalidInputError, match="step 1 is empty"):
        prm.score([{"problem": "1 + 1?", "steps": ["2", " "]}])
    policy, reference = pair
    for options, message in (({"beta": -1}, "beta"), ({"reward": "sigmoid"}, "reward"), ({"reference_model": ""}, "reference_model")):
        with pytest.raises(FormatError, match=message):
            PRM(str(policy), device="cpu", dtype="float32", **options)


def test_a_plain_causal_lm_needs_the_format_and_a_matching_reference(pair, tmp_path: Path) -> None:
    policy, reference = pair
    anonymous = shutil.copytree(policy, tmp_path / "my-prm")
    with pytest.raises(FormatError, match="pass format="):
        PRM(str(anonymous), device="cpu")
    other = shutil.copytree(reference, tmp_path / "other-ref")
    config = json.loads((other / "config.json").read_text())
    config["num_key_value_heads"] = 1  # a different KV layout cannot share the pool
    (other / "config.json").write_text(json.dumps(config))
    shapes = tc.backbone_tensor_shapes(config) | {"lm_head.weight": (tc.EMBED_ROWS, tc.HIDDEN)}
    for shard in other.glob("model-*.safetensors"):
        shard.unlink()
    (other / "model.safetensors.index.json").unlink()
    save_file(tc.random_weights(shapes, seed=3, dtype=torch.float32), str(other / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cannot share one KV pool"):
        PRM(str(anonymous), format="implicit_prm", device="cpu", reference_model=str(other))


def test_rewards_are_bit_identical_however_an_item_is_batched(tmp_path: Path, single_torch_thread) -> None:
    """Deterministic scoring (the default) covers both models and their LM heads: alone, among other items, in chunks
    of 24 tokens and from the prefix cache, an item gets the same bits (on a width where plain CPU matmuls differ)."""
    policy, reference = build_eurus_pair(tmp_path, hidden_size=256, intermediate_size=1024, num_attention_heads=8)
    items = [{"problem": p, "steps": s} for p, s in ITEMS]
    runs = []
    for options in ({}, {"max_num_batched_tokens": 24}):
        prm = PRM(str(policy), device="cpu", dtype="float32", reference_model=str(reference), **options)
        try:
            assert prm.deterministic
            runs.append([prm.score([item])[0].step_rewards for item in items])  # alone
            runs.append([r.step_rewards for r in prm.score(items[::-1])][::-1])  # together, other order, cached prefixes
        finally:
            prm.close()
    assert all(run == runs[0] for run in runs[1:])
