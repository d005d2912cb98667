"""Independent reference step rewards: transformers' own modeling code plus each family's published formula.

Nothing here imports prmserve. Backbones come from transformers (`Qwen2Model`, `AutoModelForCausalLM`,
`AutoModelForSequenceClassification`, `AutoModelForTokenClassification`); heads transformers lacks (Qwen2ForProcessRewardModel's `score`
MLP, Skywork's `v_head`, Qwen2ForRewardModel's `score` MLP) are applied with plain torch from the
checkpoint's own tensors. Inputs are built as the model cards' example code builds them: the
checkpoint's tokenizer through `AutoTokenizer`, chat templates through `apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Model,
)

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@functools.cache
def tokenizer_of(ckpt_dir: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer exactly as the model cards load it."""
    return AutoTokenizer.from_pretrained(ckpt_dir)


@functools.cache
def architecture_of(ckpt_dir: str) -> str:
    """`architectures[0]` of the checkpoint's config.json."""
    return json.loads((Path(ckpt_dir) / "config.json").read_text())["architectures"][0]


def _loaded(model: PreTrainedModel, info: dict) -> PreTrainedModel:
    """Fail loudly if transformers left any weight of the model uninitialised."""
    if info["missing_keys"] or info["mismatched_keys"]:
        raise AssertionError(f"transformers could not load {info['missing_keys']} {info['mismatched_keys']}")
    return model.eval()


@functools.cache
def qwen2_backbone(ckpt_dir: str, dtype: torch.dtype) -> PreTrainedModel:
    """The `model.*` Qwen2 decoder of a checkpoint whose head transformers does not know."""
    return _loaded(*Qwen2Model.from_pretrained(ckpt_dir, dtype=dtype, output_loading_info=True))


@functools.cache
def causal_lm(ckpt_dir: str, dtype: torch.dtype) -> PreTrainedModel:
    """A *ForCausalLM checkpoint loaded by transformers with its LM head."""
    return _loaded(*AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype, output_loading_info=True))


@functools.cache
def sequence_classifier(ckpt_dir: str, dtype: torch.dtype) -> PreTrainedModel:
    """A *ForSequenceClassification checkpoint loaded by transformers with its `score` head."""
    model, info = AutoModelForSequenceClassification.from_pretrained(ckpt_dir, dtype=dtype, output_loading_info=True)
    return _loaded(model, info)


@functools.cache
def token_classifier(ckpt_dir: str, dtype: torch.dtype) -> PreTrainedModel:
    """A *ForTokenClassification checkpoint loaded by transformers with its `score` head."""
    model, info = AutoModelForTokenClassification.from_pretrained(ckpt_dir, dtype=dtype, output_loading_info=True)
    return _loaded(model, info)


def head_tensors(ckpt_dir: str, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix`, read from whichever weight files the checkpoint has."""
    directory = Path(ckpt_dir)
    found: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
    for path in directory.glob("pytorch_model*.bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        found.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return {k[len(prefix) :]: v.to(dtype) for k, v in found.items()}


def qwen_score_mlp(ckpt_dir: str, hidden: torch.Tensor) -> torch.Tensor:
    """Qwen's `score = Sequential(Linear(H,H), ReLU(), Linear(H,labels))`, in the hidden states' dtype."""
    w = head_tensors(ckpt_dir, "score.", hidden.dtype)
    return F.linear(F.relu(F.linear(hidden, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])


@torch.no_grad()
def qwen_prm_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """Qwen2.5-Math-PRM card: ChatML, `<extra_0>` after every step, softmax(logits)[1] at each separator."""
    system_prompt = options.pop("system_prompt", QWEN_MATH_SYSTEM)
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages += [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    conversation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    input_ids = tokenizer.encode(conversation, return_tensors="pt")
    hidden = qwen2_backbone(ckpt_dir, dtype)(input_ids=input_ids).last_hidden_state
    probabilities = F.softmax(qwen_score_mlp(ckpt_dir, hidden), dim=-1)  # bf16 in, bf16 out, as the card
    step_sep_id = tokenizer.encode("<extra_0>")[0]
    return probabilities[input_ids == step_sep_id][:, 1].float().tolist()


@torch.no_grad()
def skywork_prm_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """Skywork's prepare_input: BOS + problem + newline, each response line encoded alone then a flagged newline."""
    _no_options_left(options)
    if any("\n" in step for step in steps):
        raise ValueError("a Skywork step is one line: the response is split on newlines")
    tokenizer = tokenizer_of(ckpt_dir)
    step_token = "\n"
    input_ids = tokenizer.encode(tokenizer.bos_token + problem + "\n")
    flags = [0] * len(input_ids)
    step_token_id = tokenizer.encode(step_token)[-1]
    for piece in step_token.join(steps).split(step_token):
        piece_ids = (tokenizer.encode(piece) if piece != "" else []) + [step_token_id]
        input_ids += piece_ids
        flags += [0] * (len(piece_ids) - 1) + [1]
    ids = torch.tensor([input_ids])
    hidden = qwen2_backbone(ckpt_dir, dtype)(input_ids=ids).last_hidden_state[0]
    v_head = head_tensors(ckpt_dir, "v_head.summary.", hidden.dtype)
    values = torch.sigmoid(F.linear(hidden, v_head["weight"], v_head["bias"])).squeeze(-1)
    return values[torch.tensor(flags, dtype=torch.bool)].float().tolist()


@torch.no_grad()
def math_shepherd_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """Math-Shepherd card: f"{question} {output}", steps as given, each ending in " ки", one per line;
    softmax over the [+, -] logits at the tag. `preset="openr"`: OpenR's Qwen PRM (`openr_prm_rewards`)."""
    if options.pop("preset", "math_shepherd") == "openr":
        return openr_prm_rewards(ckpt_dir, problem, steps, dtype, **options)
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    output = "\n".join(f"{step} ки" for step in steps)
    input_ids = torch.tensor([tokenizer.encode(f"{problem} {output}")])
    candidate_tokens = tokenizer.encode("+ -")[1:]
    step_tag_id = tokenizer.encode("ки")[-1]
    logits = causal_lm(ckpt_dir, dtype)(input_ids).logits[:, :, candidate_tokens]
    scores = logits.softmax(dim=-1)[:, :, 0]
    return scores[input_ids == step_tag_id].float().tolist()


# OpenR (github.com/openreasoner/openr): the tag its evaluation writes after each step for Qwen PRMs
# (reason/evaluation/evaluate.py, prm_step_tag), and the separator of the Qwen policy's steps (lm_step_tag).
OPENR_PRM_STEP_TAG = "\n\n\n\n\n "
OPENR_LM_STEP_TAG = "\n\n"


def openr_prm_input(question: str, steps: list[str]) -> str:
    """OpenR's reward-model input for the policy's answer (its steps joined by lm_step_tag):
    RewardModelCallingFunction.replace_step_tag (reason/inference/rm_call.py) and format_str "{question} {answer}"."""
    answer = OPENR_LM_STEP_TAG.join(steps)
    splits = [s.strip() for s in answer.split(OPENR_LM_STEP_TAG)]
    response = f" {OPENR_PRM_STEP_TAG}".join([s for s in splits if s != ""])
    response += f" {OPENR_PRM_STEP_TAG}"
    return "{question} {answer}".format(question=question, answer=response)


@torch.no_grad()
def openr_prm_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """OpenR's Math-psa, as prm/infer_fns.py's _qwen_math_infer_fn scores `openr_prm_input`: softmax over the
    logits of encode(" + -") at every position equal to encode(" \n\n\n\n\n"), probability of " +"."""
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    candidate_tokens = tokenizer.encode(" + -")
    step_tag_id = torch.tensor([tokenizer.encode(" \n\n\n\n\n")])
    input_id = torch.tensor([tokenizer.encode(openr_prm_input(problem, steps))])
    logits = causal_lm(ckpt_dir, dtype)(input_id).logits[:, :, candidate_tokens]
    scores = logits.softmax(dim=-1)[:, :, 0]
    return scores[input_id == step_tag_id].float().tolist()


@torch.no_grad()
def rlhflow_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """RLHFlow card: one user turn per (stripped) step, assistant "+" after each; [+, -] softmax at position -3."""
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    model = causal_lm(ckpt_dir, dtype)
    candidate_tokens = [tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]]
    conversation: list[dict[str, str]] = []
    rewards = []
    for k, step in enumerate(step.strip() for step in steps):
        text = problem + " " + step if k == 0 else step
        conversation.append({"content": text, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        input_ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]
        logits = model(input_ids).logits[:, -3, candidate_tokens]
        rewards.append(logits.softmax(dim=-1)[0, 0].item())
    return rewards


@torch.no_grad()
def llemma_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """REBASE / ETS Llemma PRM: question + newline, steps ending in " ки"; sigmoid(mean of logits) at the tag."""
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    text = problem + "\n" + "\n".join(f"{step} ки" for step in steps)
    input_ids = torch.tensor([tokenizer.encode(text)])
    tag_id = tokenizer.encode(" ки")[-1]
    logits = causal_lm(ckpt_dir, dtype)(input_ids).logits
    return torch.sigmoid(logits.mean(dim=-1))[input_ids == tag_id].float().tolist()


@torch.no_grad()
def outcome_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """Outcome RMs: the whole solution (steps joined by blank lines) as the assistant turn; the raw score at the last token.

    Qwen2ForRewardModel as the Qwen2.5-Math-RM card (with its math system message); *ForSequenceClassification
    as the Skywork-Reward card (user + assistant only).
    """
    _no_options_left(options)
    tokenizer = tokenizer_of(ckpt_dir)
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": "\n\n".join(steps)}]
    if architecture_of(ckpt_dir) == "Qwen2ForRewardModel":
        messages.insert(0, {"role": "system", "content": QWEN_MATH_SYSTEM})
        conversation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_ids = tokenizer.encode(conversation, return_tensors="pt", add_special_tokens=False)
        hidden = qwen2_backbone(ckpt_dir, dtype)(input_ids=input_ids).last_hidden_state[:, -1]
        return qwen_score_mlp(ckpt_dir, hidden)[0].float().tolist()
    input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    return [sequence_classifier(ckpt_dir, dtype)(input_ids).logits[0][0].item()]


def trl_prm_input(tokenizer: PreTrainedTokenizerBase, prompt: str, completions: list[str], step_separator: str) -> tuple[list[int], list[int]]:
    """TRL's PRMTrainer.tokenize_row (trl/trainer/prm_trainer.py), untruncated: (input_ids, labelled positions).

    The prompt and every completion are tokenised alone without special tokens, each completion followed
    by `encode(step_separator, add_special_tokens=False)`, the label on its last token; BOS first if any.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + separator_ids for c in completions]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    input_ids, positions = list(prompt_ids), []
    for ids in completions_ids:
        input_ids += ids
        positions.append(len(input_ids) - 1)
    return input_ids, positions


@torch.no_grad()
def token_classification_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """PRMs trained by TRL's PRMTrainer, run by transformers' *ForTokenClassification: softmax over the two
    labels at each labelled token; reward p1 (HuggingFaceH4) or p1 - p0 (PURE)."""
    step_separator = options.pop("step_separator", "\n")
    reward = options.pop("reward", "p1")
    _no_options_left(options)
    input_ids, positions = trl_prm_input(tokenizer_of(ckpt_dir), problem, steps, step_separator)
    logits = token_classifier(ckpt_dir, dtype)(torch.tensor([input_ids])).logits[0, positions]
    probabilities = logits.softmax(dim=-1)
    values = probabilities[:, 1] - probabilities[:, 0] if reward == "p1_minus_p0" else probabilities[:, 1]
    return values.float().tolist()


UNIVERSAL_PRM_SYSTEM = "You are a helpful assistant."


def universal_prm_prefixes(tokenizer: PreTrainedTokenizerBase, problem: str, steps: list[str], reference_answer: str = "") -> list[list[int]]:
    """The Universal-PRM-7B card's input for every step prefix: system + the question with its reference-answer
    line (`question + "\\n\\n###\\n\\nThe reference answer is: " + ...`) through the chat template with the
    generation prompt (tokenize=True), then `tokenizer("\\n\\n".join(steps[:k]) + "\\n\\n")["input_ids"]` and the EOS id."""
    if reference_answer != "":
        question_wgt = problem + "\n\n###\n\nThe reference answer is: " + reference_answer
    else:
        question_wgt = problem + "\n\n###\n\nThe reference answer is: There is no reference answer for this question."
    messages = [{"role": "system", "content": UNIVERSAL_PRM_SYSTEM}, {"role": "user", "content": question_wgt}]
    query_id = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(query_id, list):  # transformers 5 returns a BatchEncoding where 4.x returned the ids
        query_id = list(query_id["input_ids"])
    prefixes = []
    for step_idx in range(1, len(steps) + 1):
        responses = "\n\n".join(steps[:step_idx]) + "\n\n"
        answer_tokens = tokenizer(responses)["input_ids"] + [tokenizer.eos_token_id]
        prefixes.append(query_id + answer_tokens)
    return prefixes


@torch.no_grad()
def universal_prm_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """Universal-PRM-7B card: one forward pass per step prefix (`universal_prm_prefixes`), sigmoid of the
    one output; the model is transformers' Qwen2ForSequenceClassification (the score at the last token)."""
    reference_answer = options.pop("reference_answer", None) or ""
    _no_options_left(options)
    model = sequence_classifier(ckpt_dir, dtype)
    rewards = []
    for ids in universal_prm_prefixes(tokenizer_of(ckpt_dir), problem, steps, reference_answer):
        outputs = model(input_ids=torch.tensor([ids]))
        rewards.append(torch.sigmoid(outputs[0]).float().item())
    return rewards


def internlm2_tokenizer(ckpt_dir: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer without its remote code (its config.json's auto_map names remote classes)."""
    return AutoTokenizer.from_pretrained(ckpt_dir, trust_remote_code=False)


def internlm2_to_llama(state: dict[str, torch.Tensor], config: dict, packing: str = "grouped") -> dict[str, torch.Tensor]:
    """InternLM2ForRewardModel tensors under LlamaForSequenceClassification's names.

    InternLM2Attention (modeling_internlm2.py) splits `wqkv`'s output as
    `rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups)`: for KV head h, slots 0..groups-1 are the
    queries h*groups + slot, slot -2 the key, slot -1 the value. `packing="concatenated"` reads it as plain
    [q; k; v] instead (wrong, for the test that the order matters).
    """
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    groups = heads // kv
    out = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"], "model.norm.weight": state["model.norm.weight"],
           "score.weight": state["v_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        wqkv = state[p + "attention.wqkv.weight"]
        if packing == "grouped":
            row = lambda h, slot: wqkv[(h * (groups + 2) + slot) * d : (h * (groups + 2) + slot + 1) * d]  # noqa: E731
            out[a + "q_proj.weight"] = torch.cat([row(qh // groups, qh % groups) for qh in range(heads)])
            out[a + "k_proj.weight"] = torch.cat([row(h, groups) for h in range(kv)])
            out[a + "v_proj.weight"] = torch.cat([row(h, groups + 1) for h in range(kv)])
        else:
            out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = wqkv.split([heads * d, kv * d, kv * d])
        out[a + "o_proj.weight"] = state[p + "attention.wo.weight"]
        out[p + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        out[p + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        out[p + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        out[p + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    return out


@functools.cache
def internlm2_as_llama(ckpt_dir: str, dtype: torch.dtype, packing: str = "grouped") -> PreTrainedModel:
    """transformers' LlamaForSequenceClassification holding an InternLM2ForRewardModel's weights (transformers has
    no InternLM2 class): the same RMSNorm / rotary / GQA / SwiGLU decoder, one-label linear head without bias."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    llama = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"], attention_bias=config["bias"], mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config["rope_theta"])}, num_labels=1, pad_token_id=None,
        tie_word_embeddings=False,
    )
    if config.get("rope_scaling"):
        raise ValueError("the reference implements InternLM2's default rotary embedding only")
    model = LlamaForSequenceClassification(llama).to(dtype)
    state = internlm2_to_llama(head_tensors(ckpt_dir, "", dtype), config, packing)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def internlm2_card_input(ckpt_dir: str, problem: str, steps: list[str]) -> list[int]:
    """InternLM2ForRewardModel.get_score: the chat (user, assistant = steps joined by blank lines) through
    `apply_chat_template(tokenize=False)`, `tokenizer.encode` (special tokens on), then `reward_token_id`."""
    tokenizer = internlm2_tokenizer(ckpt_dir)
    chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": "\n\n".join(steps)}]
    conversation_str = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    reward_token_id = json.loads((Path(ckpt_dir) / "config.json").read_text())["reward_token_id"]
    return list(tokenizer.encode(conversation_str)) + [reward_token_id]


@torch.no_grad()
def internlm2_rewards(ckpt_dir: str, problem: str, steps: list[str], dtype: torch.dtype, **options) -> list[float]:
    """InternLM2 reward models: `v_head` at the last token (the reward token) of `internlm2_card_input`, raw score."""
    packing = options.pop("packing", "grouped")
    _no_options_left(options)
    input_ids = torch.tensor([internlm2_card_input(ckpt_dir, problem, steps)])
    return [internlm2_as_llama(ckpt_dir, dtype, packing)(input_ids).logits[0, 0].item()]


def _no_options_left(options: dict) -> None:
    """Refuse options a family does not take, so a typo in a test cannot pass silently."""
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")


REFERENCES = {
    "qwen_prm": qwen_prm_rewards,
    "skywork_prm": skywork_prm_rewards,
    "math_shepherd": math_shepherd_rewards,
    "rlhflow": rlhflow_rewards,
    "llemma": llemma_rewards,
    "outcome": outcome_rewards,
    "token_classification": token_classification_rewards,
    "universal_prm": universal_prm_rewards,
}


def reference_step_rewards(
    family: str, ckpt_dir: str | Path, problem: str, steps: list[str], dtype: torch.dtype = torch.float32, **options
) -> list[float]:
    """Step rewards of `family`'s reference code for one (problem, steps) item (one score for `outcome`)."""
    return REFERENCES[family](str(ckpt_dir), problem, list(steps), dtype, **options)
