"""The RL frameworks' drop-ins: chat text read back into problem and response, OpenRLHF's /get_reward,
verl's /classify and compute_score, and a token-id reward engine — each against `PRM.score`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from prmserve.errors import InvalidInputError
from prmserve.integrations.chat_text import problem_of, split_chat_text

PROBLEM = "Tom has 3 apples and buys 2 more. How many?"
RESPONSE = "3 + 2 = 5.\n\nHe has 5 apples."
# The policies' chat templates as their tokenizer_config.json files publish them (each file names its source
# and licence), with the BOS and EOS tokens those files declare, rendered by transformers' apply_chat_template.
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIAL_TOKENS = {
    "qwen2.5-math-7b-instruct": (None, "<|im_end|>"),
    "qwen2.5-3b-instruct": (None, "<|im_end|>"),
    "llama-3.1-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-instruct-v0.3": ("<s>", "</s>"),
    "deepseek-math-7b-rl": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-r1-distill-llama-8b": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
# Mistral v0.3 writes the system message into the last user turn, so no text-level reading can tell them apart.
SYSTEM_IN_USER_TURN = {"mistral-7b-instruct-v0.3"}


def chat_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A stand-in tokenizer carrying the real template and special tokens (only rendering is exercised)."""
    bos, eos = SPECIAL_TOKENS[name]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")),
                                        bos_token=bos, eos_token=eos)
    tokenizer.chat_template = (CHAT_TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer


def rendered(name: str, with_response: bool, system: str | None = None) -> str:
    """The template's prompt (with its generation prompt), or the whole conversation with the answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROBLEM}]
    if with_response:
        messages.append({"role": "assistant", "content": RESPONSE})
    return chat_tokenizer(name).apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_response)


def query(name: str, system: str | None = None) -> str:
    """What a trainer sends: the rendered prompt, the generated response, the EOS the policy stops on."""
    return rendered(name, False, system) + RESPONSE + SPECIAL_TOKENS[name][1]


def test_every_template_file_is_shipped_with_its_source() -> None:
    files = sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))
    assert files == sorted(SPECIAL_TOKENS)
    for name in files:
        first = (CHAT_TEMPLATES / f"{name}.jinja").read_text().splitlines()[0]
        assert first.startswith("{#- chat_template of ") and "licence:" in first and first.endswith("-#}")


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("name", list(SPECIAL_TOKENS))
def test_chat_text_is_read_back(name: str, system: str | None) -> None:
    prompt, whole = rendered(name, False, system), rendered(name, True, system)
    if not (system and name in SYSTEM_IN_USER_TURN):
        assert problem_of(prompt) == PROBLEM
    assert split_chat_text(whole) == (PROBLEM, RESPONSE)  # the rendered conversation
    assert split_chat_text(query(name, system))[1] == RESPONSE  # verl's /classify: prompt + response as one text
    assert split_chat_text(query(name, system), prompt)[1] == RESPONSE  # OpenRLHF's query with its prompt


def test_unknown_chat_format_is_named() -> None:
    with pytest.raises(InvalidInputError, match="chatml, llama3"):
        split_chat_text("Question: 1 + 1?\nAnswer: 2")


def test_openrlhf_get_reward(server, offline_prm) -> None:
    names = list(SPECIAL_TOKENS)
    wrong = rendered("llama-3.1-8b-instruct", False) + "3 + 2 = 6.<|eot_id|>"
    body = {"query": [query(n) for n in names] + [wrong], "prompts": [rendered(n, False) for n in names + [names[2]]],
            "labels": ["5"] * (len(names) + 1)}
    answer = httpx.post(server.url + "/get_reward", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    right, six = (offline_prm.score([{"problem": PROBLEM, "completion": c}])[0].aggregate("min") for c in (RESPONSE, "3 + 2 = 6."))
    assert payload["rewards"] == pytest.approx([right] * len(names) + [six], abs=1e-6) and payload["scores"] == payload["rewards"]
    assert payload["extra_logs"]["prm_num_steps"] == [2] * len(names) + [1]
    bad = httpx.post(server.url + "/get_reward", json={"query": ["no chat markers"], "prompts": ["x"]}, timeout=30)
    assert bad.status_code == 400 and "query 0" in bad.json()["error"]["message"]


def test_vllm_classify(server, offline_prm) -> None:
    texts = [text for n in SPECIAL_TOKENS for text in (query(n), rendered(n, True))]  # verl's prompt + response, a whole chat
    answer = httpx.post(server.url + "/classify", json={"model": None, "input": texts}, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    reward = offline_prm.score([{"problem": PROBLEM, "completion": RESPONSE}])[0].aggregate("min")
    assert [d["index"] for d in data] == list(range(len(texts))) and data[0]["num_classes"] == 2
    for d in data:
        assert d["probs"] == pytest.approx([1 - reward, reward], abs=1e-6)
    assert answer.json()["usage"]["prompt_tokens"] > 0
    refused = httpx.post(server.url + "/classify", json={"input": texts[0], "activation": False}, timeout=30)
    assert refused.status_code == 400


def test_verl_compute_score(server, offline_prm, monkeypatch) -> None:
    from prmserve.integrations import verl

    monkeypatch.setenv("PRMSERVE_URL", server.url)
    verl._clients.clear()
    prompt = rendered("qwen2.5-math-7b-instruct", False)  # the problem read from a rendered prompt when no question field

    async def many() -> list[float]:
        calls = [verl.compute_score("gsm8k", c, "5", {"question": PROBLEM}) for c in (RESPONSE, "3 + 2 = 6.")]
        return await asyncio.gather(*calls, verl.compute_score("math", RESPONSE, "5", {"prompt": prompt}))

    want = [offline_prm.score([{"problem": PROBLEM, "completion": c}])[0].aggregate("min") for c in (RESPONSE, "3 + 2 = 6.", RESPONSE)]
    assert asyncio.run(many()) == pytest.approx(want, abs=1e-6)
    assert {verl.problem_of_sample({"prompt": rendered(n, False)}) for n in SPECIAL_TOKENS} == {PROBLEM}
    verl._clients.clear()
    with pytest.raises(InvalidInputError, match="extra_info"):
        asyncio.run(verl.compute_score("gsm8k", RESPONSE, "5", {}))


def test_token_id_reward_engine(server, offline_prm, qwen_prm_dir) -> None:
    from prmserve.integrations.skyrl import RewardEngine
    from prmserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(qwen_prm_dir)  # a ChatML policy tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False, add_generation_prompt=True)
    input_ids = [tokenizer.encode(prompt, add_special_tokens=False)]
    output_ids = [tokenizer.encode(RESPONSE + "<|im_end|>", add_special_tokens=False)]
    engine = RewardEngine(server.url, tokenizer)
    try:
        got = engine.score(input_ids, output_ids, priority=-1)
    finally:
        engine.close()
    want = offline_prm.score([{"problem": PROBLEM, "completion": RESPONSE}])[0].aggregate("min")
    assert got == pytest.approx([want], abs=1e-6)
