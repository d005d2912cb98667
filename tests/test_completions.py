"""Completions and chats as items, their step spans, RL token rewards, and the search-and-learn drop-in."""

from __future__ import annotations

import pytest

from prmserve.completions import chat_to_completion, split_completion, split_rule
from prmserve.errors import InvalidInputError
from prmserve.rl import token_rewards
from prmserve.results import ScoreResult

PROBLEM = "Tom has 3 apples and buys 2 more. How many?"
COMPLETION = "3 + 2 = 5.\n\nHe has 5 apples.\n\n"


def test_split_drops_empty_pieces_and_keeps_spans() -> None:
    steps, spans = split_completion("\n\nA.\n\n\n\nB.\n\n  \n\n", "\n\n")
    assert steps == ["A.", "B."]
    assert spans == [(2, 4), (8, 10)]
    text = "Step 1: a\nStep 2: b"
    steps, spans = split_completion(text, split_rule({"regex": r"\n(?=Step)"}))
    assert steps == ["Step 1: a", "Step 2: b"] and [text[s:e] for s, e in spans] == steps
    with pytest.raises(InvalidInputError, match="does not compile"):
        split_rule({"regex": "("})
    with pytest.raises(InvalidInputError, match="non-empty separator"):
        split_rule("")


def test_chat_turns_give_problem_and_completion() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM},
                {"role": "assistant", "content": [{"type": "text", "text": "3 + 2 = 5."}]}]
    assert chat_to_completion(messages) == (PROBLEM, "3 + 2 = 5.")
    with pytest.raises(InvalidInputError, match="last message must be the assistant"):
        chat_to_completion(messages[:2])
    with pytest.raises(InvalidInputError, match="needs a user turn"):
        chat_to_completion([messages[0], messages[2]])


def test_completion_items_score_like_their_steps(offline_prm) -> None:
    steps = ["3 + 2 = 5.", "He has 5 apples."]
    want = offline_prm.score([{"problem": PROBLEM, "steps": steps}])[0]
    got = offline_prm.score([
        {"problem": PROBLEM, "completion": COMPLETION},
        {"messages": [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": COMPLETION}]},
        {"problem": PROBLEM, "completion": "3 + 2 = 5.|He has 5 apples.", "step_split": "|"},
    ])
    for result in got:
        assert result.step_rewards == pytest.approx(want.step_rewards, abs=1e-6)
    assert [COMPLETION[s:e] for s, e in got[0].step_spans] == steps
    assert want.step_spans is None
    with pytest.raises(InvalidInputError, match="item 0: the completion holds no step|item 0: 'completion' must be"):
        offline_prm.score([{"problem": PROBLEM, "completion": "\n\n\n\n"}])
    with pytest.raises(InvalidInputError, match="applies to 'completion'"):
        offline_prm.score([{"problem": PROBLEM, "steps": steps, "step_split": "\n"}])


def test_a_kept_completion_extends_like_steps(offline_prm) -> None:
    node = offline_prm.score([{"problem": PROBLEM, "completion": "3 + 2 = 5.\n\n"}], keep=True)[0]
    kid = offline_prm.extend(node.handle, [["He has 5 apples."]])[0]
    want = offline_prm.score([{"problem": PROBLEM, "completion": COMPLETION}])[0]
    assert kid.step_rewards == pytest.approx(want.step_rewards, abs=1e-6)
    offline_prm.release(node.handle)


class _CharTokenizer:
    """A stand-in fast tokenizer: one token per two characters, with offsets."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"offset_mapping": [(i, min(i + 2, len(text))) for i in range(0, len(text), 2)]}


def test_token_rewards_last_and_all() -> None:
    completion = "ab\n\ncdef"  # steps "ab" [0, 2) and "cdef" [4, 8)
    result = ScoreResult([0.9, 0.2], step_spans=[(0, 2), (4, 8)])
    assert token_rewards(result, _CharTokenizer(), completion) == [0.9, 0.0, 0.0, 0.2]
    assert token_rewards(result, _CharTokenizer(), completion, mode="all") == [0.9, 0.0, 0.2, 0.2]
    with pytest.raises(InvalidInputError, match="needs step spans"):
        token_rewards(ScoreResult([0.5]), _CharTokenizer(), completion)


@pytest.mark.parametrize("name", ["real_qwen2", "llama3_layout", "sentencepiece_layout"])
def test_token_rewards_with_different_tokenizers(name: str, tmp_path) -> None:
    """The real Qwen2 BPE and the tests' Llama 3 and SentencePiece-style tokenizers: the reward lands on
    the token ending each step, every other token gets 0, and the list has one entry per token."""
    from transformers import AutoTokenizer

    import tiny_checkpoints
    from real_tokenizers import write_real_qwen2_tokenizer

    writers = {"real_qwen2": write_real_qwen2_tokenizer, "llama3_layout": tiny_checkpoints.write_llama3_tokenizer,
               "sentencepiece_layout": tiny_checkpoints.write_sentencepiece_tokenizer}
    writers[name](tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    completion = "First, 12 + 7 = 19.\n\nSo the answer is 19 apples.\n\n"
    steps, spans = split_completion(completion, "\n\n")
    result = ScoreResult([0.75, 0.25], step_spans=spans)
    rewards = token_rewards(result, tokenizer, completion)
    offsets = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(rewards) == len(offsets)
    for (start, end), reward in zip(spans, result.step_rewards):
        last = start + len(completion[start:end].rstrip()) - 1
        holder = next(i for i, (a, b) in enumerate(offsets) if a <= last < b)
        assert rewards[holder] == reward
    assert sorted(r for r in rewards if r) == [0.25, 0.75]


def test_search_and_learn_drop_in_local_and_remote(offline_prm, qwen_prm_dir, server) -> None:
    from prmserve.integrations.search_and_learn import PRM as SalPRM

    questions = [PROBLEM, "What is 2 * 4?"]
    outputs = [[COMPLETION, "3 + 2 = 6."], ["2 * 4 = 8.\n\nThe answer is 8."]]
    want = [[offline_prm.score([{"problem": q, "completion": a}])[0].step_rewards for a in answers]
            for q, answers in zip(questions, outputs)]
    local = SalPRM(str(qwen_prm_dir), device="cpu")
    try:
        got = local.score(questions, outputs)
    finally:
        local.close()
    remote = SalPRM(server.url)
    try:
        over_http = remote.score(questions, outputs)
    finally:
        remote.close()
    for scores in (got, over_http):
        assert [len(a) for a in scores] == [2, 1] and [len(s) for s in scores[0]] == [2, 1]
        for q_got, q_want in zip(scores, want):
            for a_got, a_want in zip(q_got, q_want):
                assert a_got == pytest.approx(a_want, abs=1e-6)
