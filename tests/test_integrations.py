"""The RL frameworks' drop-ins: chat text read back into problem and response, OpenRLHF's /get_reward,
verl's /classify and compute_score, and a token-id reward engine — each against `PRM.score`."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from prmserve.errors import InvalidInputError
from prmserve.integrations.chat_text import problem_of, split_chat_text

PROBLEM = "Tom has 3 apples and buys 2 more. How many?"
RESPONSE = "3 + 2 = 5.\n\nHe has 5 apples."
# The chat formats' shapes as their published templates render them (system turn, then user, then the
# assistant's answer), written as Jinja and rendered by transformers' apply_chat_template.
TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
              "{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "mistral": "<s>{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
               "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}",
    "deepseek": "<｜begin▁of▁sentence｜>{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n\n"
                "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}",
    "deepseek_r1": "<｜begin▁of▁sentence｜>{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
                   "{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}",
}


def rendered(name: str, with_response: bool) -> str:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    tokenizer.chat_template = TEMPLATES[name]
    messages = [{"role": "user", "content": PROBLEM}]
    if with_response:
        messages.append({"role": "assistant", "content": RESPONSE})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_response)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_text_is_read_back(name: str) -> None:
    prompt, whole = rendered(name, False), rendered(name, True)
    assert problem_of(prompt) == PROBLEM
    problem, response = split_chat_text(whole)
    assert (problem, response.strip()) == (PROBLEM, RESPONSE)
    if whole.startswith(prompt):  # OpenRLHF's case: the query is the prompt followed by the response
        assert split_chat_text(whole, prompt)[1].strip() == RESPONSE


def test_unknown_chat_format_is_named() -> None:
    with pytest.raises(InvalidInputError, match="chatml, llama3"):
        split_chat_text("Question: 1 + 1?\nAnswer: 2")


def test_openrlhf_get_reward(server, offline_prm) -> None:
    prompt = rendered("chatml", False)
    body = {"query": [prompt + RESPONSE + "<|im_end|>", prompt + "3 + 2 = 6."], "prompts": [prompt, prompt], "labels": ["5", "5"]}
    answer = httpx.post(server.url + "/get_reward", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    want = [offline_prm.score([{"problem": PROBLEM, "completion": c}])[0].aggregate("min") for c in (RESPONSE, "3 + 2 = 6.")]
    assert payload["rewards"] == pytest.approx(want, abs=1e-6) and payload["scores"] == payload["rewards"]
    assert payload["extra_logs"]["prm_num_steps"] == [2, 1]
    bad = httpx.post(server.url + "/get_reward", json={"query": ["no chat markers"], "prompts": ["x"]}, timeout=30)
    assert bad.status_code == 400 and "query 0" in bad.json()["error"]["message"]


def test_vllm_classify(server, offline_prm) -> None:
    text = rendered("chatml", True)
    answer = httpx.post(server.url + "/classify", json={"model": None, "input": [text, text]}, timeout=30)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    reward = offline_prm.score([{"problem": PROBLEM, "completion": RESPONSE}])[0].aggregate("min")
    assert [d["index"] for d in data] == [0, 1] and data[0]["num_classes"] == 2
    assert data[0]["probs"] == pytest.approx([1 - reward, reward], abs=1e-6)
    assert answer.json()["usage"]["prompt_tokens"] > 0
    refused = httpx.post(server.url + "/classify", json={"input": text, "activation": False}, timeout=30)
    assert refused.status_code == 400


def test_verl_compute_score(server, offline_prm, monkeypatch) -> None:
    from prmserve.integrations import verl

    monkeypatch.setenv("PRMSERVE_URL", server.url)
    verl._clients.clear()

    async def many() -> list[float]:
        calls = [verl.compute_score("gsm8k", c, "5", {"question": PROBLEM}) for c in (RESPONSE, "3 + 2 = 6.")]
        return await asyncio.gather(*calls)

    want = [offline_prm.score([{"problem": PROBLEM, "completion": c}])[0].aggregate("min") for c in (RESPONSE, "3 + 2 = 6.")]
    assert asyncio.run(many()) == pytest.approx(want, abs=1e-6)
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
