"""Tiny random checkpoints laid out on disk exactly like the public PRMs, so tests need no downloads.

Each builder writes config.json, weights and tokenizer files with the same names, keys, tensor
names, file kinds, special tokens and chat-template style as the real checkpoint, at a toy size
(hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, a vocabulary of a few hundred).
Weights are random with a fixed seed, scaled so rewards spread over (0, 1) instead of sitting at 0.5.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
BPE_VOCAB = 480  # learned tokens before specials; configs round the embedding rows up to 512
EMBED_ROWS = 512

# Qwen2's pre-tokenizer split (digits one by one) and Llama 3's (digits in runs of up to three).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# Qwen2.5-Math style ChatML: a default math system message when the conversation brings none.
CHATML_WITH_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '" + QWEN_MATH_SYSTEM.replace("\\", "\\\\") + "' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Plain ChatML: renders exactly the messages given, so dropping the system message really drops it.
CHATML_PLAIN = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1 style: BOS in the text, an always-present dated system block, contents trimmed.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]


# ---------------------------------------------------------------------------------------------
# Training text for the tokenizers
# ---------------------------------------------------------------------------------------------


def math_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Synthetic math solutions with the step tags and markers the PRM tokenizers must know."""
    rng = random.Random(seed)
    names = ["Janet", "Tom", "Maria", "Li", "Ahmed", "the farmer", "a train", "the store"]
    things = ["eggs", "apples", "dollars", "miles", "pages", "students", "minutes", "marbles"]
    out = []
    for _ in range(lines):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        name, thing = rng.choice(names), rng.choice(things)
        out.append(
            rng.choice(
                [
                    f"Step {rng.randint(1, 9)}: {name} has {a} {thing} and buys {b} more, so {a} + {b} = {a + b}. ки",
                    f"Step {rng.randint(1, 9)}: {name} gives away {b} {thing}: {a + b} - {b} = {a}. ки",
                    f"The answer is: {a * b} ки",
                    f"So the total is $\\boxed{{{a + b}}}$.",
                    f"How many {thing} does {name} have left after {a} days?",
                    f"We compute {a} \\times {b} = {a * b} and then divide by {b}. ки",
                    f"Let x = {a}. Then 2x + {b} = {2 * a + b}, so the step is + and the next is -",
                    f"{name} earns {a} per day \n\n\n\n\n which gives {a * 7} per week \n\n\n\n\n",
                    f"If π ≈ 3.14 then √{a * a} = {a} ≤ {a + 1}, 所以答案是 {a}. ки",
                ]
            )
        )
    return out


def openr_corpus(lines: int = 200, seed: int = 1) -> list[str]:
    """Solutions laid out as OpenR writes them (" \\n\\n\\n\\n\\n " after each step), so " Step" is one token, as in Qwen2.5."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        steps = [f"Step 1: We have {a} and {b}.", f"Step 2: So {a} + {b} = {a + b}.", f"The answer is: {a + b}"]
        out.append(f"What is {a} + {b}? " + "".join(f"{step} \n\n\n\n\n " for step in steps))
    return out


def _special(content: str) -> AddedToken:
    """An added token that is matched whole and never normalised, as in real tokenizer files."""
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _added_tokens_decoder(tokenizer: Tokenizer, contents: list[str]) -> dict[str, dict]:
    """tokenizer_config.json's added_tokens_decoder block for the given special tokens."""
    return {
        str(tokenizer.token_to_id(c)): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for c in contents
    }


def byte_level_tokenizer(split_regex: str, specials: list[str], nfc: bool, extra_corpus: Sequence[str] = ()) -> Tokenizer:
    """A GPT-2 style byte-level BPE (Qwen2 / Llama 3) trained on the math corpus (plus extra_corpus), specials last."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(math_corpus() + list(extra_corpus), trainer=trainer)
    tokenizer.add_special_tokens([_special(s) for s in specials])
    return tokenizer


def sentencepiece_style_tokenizer() -> Tokenizer:
    """A Llama/Mistral style BPE: `<unk> <s> </s>`, 256 byte-fallback pieces, Metaspace, BOS added."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # Newlines are left out of the learned pieces so they fall back to <0x0A>, as in Llama's vocabulary.
    corpus = [line.replace("\n", " ") for line in math_corpus()]
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB - 256, min_frequency=2, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens([_special(s) for s in ["<unk>", "<s>", "</s>"]])
    return tokenizer


def write_qwen_tokenizer(
    directory: Path,
    extra_specials: list[str],
    chat_template: str,
    template_in_jinja_file: bool = False,
    bos_token: str | None = None,
    extra_corpus: Sequence[str] = (),
) -> Tokenizer:
    """Write a Qwen2.5 tokenizer (tokenizer.json + tokenizer_config.json + special_tokens_map.json)."""
    specials = QWEN_SPECIALS + extra_specials
    tokenizer = byte_level_tokenizer(QWEN2_SPLIT, specials, nfc=True, extra_corpus=extra_corpus)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer, specials),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *extra_specials],
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if template_in_jinja_file:
        (directory / "chat_template.jinja").write_text(chat_template)
    else:
        config["chat_template"] = chat_template
    _write_json(directory / "tokenizer_config.json", config)
    special_map = {"additional_special_tokens": config["additional_special_tokens"], "eos_token": "<|im_end|>"}
    special_map["pad_token"] = "<|endoftext|>"
    if bos_token is not None:
        special_map["bos_token"] = bos_token
    _write_json(directory / "special_tokens_map.json", special_map)
    return tokenizer


def write_llama3_tokenizer(directory: Path) -> Tokenizer:
    """Write a Llama 3.1 tokenizer: byte-level BPE, BOS <|begin_of_text|> added by the post-processor."""
    tokenizer = byte_level_tokenizer(LLAMA3_SPLIT, LLAMA3_SPECIALS, nfc=False)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|>:0 $A:0",
                pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "added_tokens_decoder": _added_tokens_decoder(tokenizer, LLAMA3_SPECIALS),
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        directory / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    )
    return tokenizer


def write_sentencepiece_tokenizer(directory: Path) -> Tokenizer:
    """Write a Llama 2 / Mistral tokenizer as converted to tokenizer.json (LlamaTokenizer, add_bos_token)."""
    tokenizer = sentencepiece_style_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": _added_tokens_decoder(tokenizer, ["<unk>", "<s>", "</s>"]),
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    _write_json(directory / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Configs and weights
# ---------------------------------------------------------------------------------------------


def qwen2_config(architecture: str, tokenizer: Tokenizer, max_positions: int = 4096, **extra: object) -> dict:
    """A Qwen2.5 config.json at toy size, keys as the released checkpoints write them."""
    return {
        "architectures": [architecture],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": max_positions,
        "max_window_layers": LAYERS,
        "model_type": "qwen2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": max_positions,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": EMBED_ROWS,
        **extra,
    }


def llama_config(architecture: str, model_type: str, vocab_size: int, bos: int, eos: int, **extra: object) -> dict:
    """A Llama / Mistral config.json at toy size (no biases, GQA)."""
    config = {
        "architectures": [architecture],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 4096,
        "model_type": model_type,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if model_type == "llama":
        config.update({"mlp_bias": False, "pretraining_tp": 1, "rope_scaling": None})
    else:
        config["sliding_window"] = None
    config.update(extra)
    return config


def backbone_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every `model.*` tensor of a Qwen2 / Qwen3 / Llama / Mistral decoder, in checkpoint order."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if config["model_type"] == "qwen3":  # per-head RMSNorm of queries and keys
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (config["intermediate_size"], hidden)
        shapes[p + "mlp.up_proj.weight"] = (config["intermediate_size"], hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, config["intermediate_size"])
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors scaled to keep activations near unit size: norms near 1, linears 1/sqrt(fan_in).

    Final head projections are 3x larger so rewards spread over (0, 1) rather than sit near 0.5.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.2 * noise
        elif name.endswith(".bias"):
            tensor = 0.2 * noise
        elif "embed_tokens" in name:
            tensor = noise
        else:
            tensor = noise / shape[-1] ** 0.5 * (1.0 if name.startswith(("model.", "score.0.")) else 3.0)
        weights[name] = tensor.to(dtype).contiguous()
    return weights


def save_sharded_safetensors(directory: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    """Write `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`."""
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[k * per_shard : (k + 1) * per_shard]}
        save_file(part, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_json(path: Path, payload: dict) -> None:
    """Write pretty JSON the way save_pretrained does."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _qwen_head(hidden: int, labels: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the Qwen PRM / RM head `score = Sequential(Linear(H,H), ReLU, Linear(H,labels))`."""
    return {
        "score.0.weight": (hidden, hidden),
        "score.0.bias": (hidden,),
        "score.2.weight": (labels, hidden),
        "score.2.bias": (labels,),
    }


# ---------------------------------------------------------------------------------------------
# Builders, one per PRM family layout
# ---------------------------------------------------------------------------------------------


def build_qwen_prm(
    directory: Path,
    template_in_jinja_file: bool = False,
    max_positions: int = 4096,
    with_lm_head: bool = False,
) -> Path:
    """Qwen2.5-Math-PRM-7B: Qwen2ForProcessRewardModel, 2-label MLP head, sharded safetensors, <extra_0>."""
    directory.mkdir(parents=True, exist_ok=True)
    template = CHATML_PLAIN if template_in_jinja_file else CHATML_WITH_DEFAULT_SYSTEM
    tokenizer = write_qwen_tokenizer(directory, ["<extra_0>"], template, template_in_jinja_file)
    config = qwen2_config(
        "Qwen2ForProcessRewardModel",
        tokenizer,
        max_positions,
        auto_map={
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
        },
    )
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | _qwen_head(HIDDEN, 2)
    if with_lm_head:
        shapes["lm_head.weight"] = (EMBED_ROWS, HIDDEN)
    save_sharded_safetensors(directory, random_weights(shapes, seed=1, dtype=torch.bfloat16), shards=2)
    return directory


def build_skywork_prm(directory: Path) -> Path:
    """Skywork-o1-Open-PRM-Qwen-2.5: Qwen2ForPrmModel, one pytorch_model.bin, v_head.summary value head."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_PLAIN, bos_token="<|endoftext|>")
    config = qwen2_config("Qwen2ForPrmModel", tokenizer)
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | {
        "lm_head.weight": (EMBED_ROWS, HIDDEN),
        "v_head.summary.weight": (1, HIDDEN),
        "v_head.summary.bias": (1,),
    }
    torch.save(random_weights(shapes, seed=2, dtype=torch.bfloat16), directory / "pytorch_model.bin")
    return directory


def _save_causal_lm(directory: Path, config: dict, seed: int, dtype: torch.dtype) -> None:
    """config.json plus a single model.safetensors holding `model.*` and `lm_head.weight`."""
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | {"lm_head.weight": (config["vocab_size"], config["hidden_size"])}
    save_file(random_weights(shapes, seed, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})


def build_math_shepherd(directory: Path) -> Path:
    """math-shepherd-mistral-7b-prm: MistralForCausalLM, Llama sentencepiece-style tokenizer with ки + -."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_sentencepiece_tokenizer(directory)
    config = llama_config("MistralForCausalLM", "mistral", tokenizer.get_vocab_size(), bos=1, eos=2)
    _save_causal_lm(directory, config, seed=3, dtype=torch.bfloat16)
    return directory


def build_math_shepherd_openr(directory: Path) -> Path:
    """OpenR's Qwen2.5-Math PRM ("math-psa"): Qwen2ForCausalLM scored at the \\n\\n\\n\\n\\n tag with ' +'/' -'."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_WITH_DEFAULT_SYSTEM, extra_corpus=openr_corpus())
    _save_causal_lm(directory, qwen2_config("Qwen2ForCausalLM", tokenizer), seed=4, dtype=torch.bfloat16)
    return directory


def build_rlhflow(directory: Path) -> Path:
    """RLHFlow Llama3.1-8B-PRM: LlamaForCausalLM with llama3 rope scaling and the Llama 3.1 chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_llama3_tokenizer(directory)
    config = llama_config(
        "LlamaForCausalLM",
        "llama",
        EMBED_ROWS,
        bos=tokenizer.token_to_id("<|begin_of_text|>"),
        eos=[tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")],
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    )
    _save_causal_lm(directory, config, seed=5, dtype=torch.bfloat16)
    return directory


def build_llemma(directory: Path) -> Path:
    """Llemma-7B PRM of REBASE / ETS: plain LlamaForCausalLM (fp32 weights), sentencepiece-style ` ки`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_sentencepiece_tokenizer(directory)
    config = llama_config(
        "LlamaForCausalLM", "llama", tokenizer.get_vocab_size(), bos=1, eos=2, torch_dtype="float32"
    )
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | {"reward_head": (2, HIDDEN)}
    weights = random_weights(shapes, seed=6, dtype=torch.float32)
    # Every LM-head row is a copy of one of the two reward-head rows, as in the released checkpoint.
    weights["lm_head.weight"] = weights.pop("reward_head").repeat(config["vocab_size"], 1)[: config["vocab_size"]]
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def build_outcome_qwen(directory: Path) -> Path:
    """Qwen2.5-Math-RM-72B layout: Qwen2ForRewardModel, one-label MLP head, sharded safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_WITH_DEFAULT_SYSTEM)
    config = qwen2_config("Qwen2ForRewardModel", tokenizer, num_labels=1)
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | _qwen_head(HIDDEN, 1)
    save_sharded_safetensors(directory, random_weights(shapes, seed=7, dtype=torch.bfloat16), shards=2)
    return directory


def build_outcome_llama(directory: Path) -> Path:
    """Skywork-Reward-Llama-3.1 layout: LlamaForSequenceClassification, `score.weight` [1, H], no bias."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_llama3_tokenizer(directory)
    config = llama_config(
        "LlamaForSequenceClassification",
        "llama",
        EMBED_ROWS,
        bos=tokenizer.token_to_id("<|begin_of_text|>"),
        eos=tokenizer.token_to_id("<|eot_id|>"),
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        torch_dtype="float32",
    )
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | {"score.weight": (1, HIDDEN)}
    save_file(random_weights(shapes, seed=8, dtype=torch.float32), str(directory / "model.safetensors"))
    return directory


TWO_LABELS = {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}}


def _token_classification_head(hidden: int) -> dict[str, tuple[int, ...]]:
    """transformers' GenericForTokenClassification head: `score` Linear(H, 2) with a bias."""
    return {"score.weight": (2, hidden), "score.bias": (2,)}


def build_token_classification_qwen2(directory: Path) -> Path:
    """HuggingFaceH4 Qwen2.5-Math-*-PRM-0.2 / PURE-PRM-7B (TRL's PRMTrainer): Qwen2ForTokenClassification, no BOS."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_WITH_DEFAULT_SYSTEM)
    config = qwen2_config("Qwen2ForTokenClassification", tokenizer, **TWO_LABELS)
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | _token_classification_head(HIDDEN)
    save_file(random_weights(shapes, seed=9, dtype=torch.bfloat16), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def build_token_classification_llama(directory: Path) -> Path:
    """A Llama 3.1 PRM from TRL's PRMTrainer: LlamaForTokenClassification, BOS <|begin_of_text|> before the prompt."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_llama3_tokenizer(directory)
    config = llama_config(
        "LlamaForTokenClassification",
        "llama",
        EMBED_ROWS,
        bos=tokenizer.token_to_id("<|begin_of_text|>"),
        eos=tokenizer.token_to_id("<|eot_id|>"),
        torch_dtype="float32",
        **TWO_LABELS,
    )
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | _token_classification_head(HIDDEN)
    save_file(random_weights(shapes, seed=10, dtype=torch.float32), str(directory / "model.safetensors"))
    return directory


QWEN3_HEAD_DIM = 32  # != HIDDEN // HEADS, as in Qwen3 (e.g. Qwen3-8B: hidden 4096, 32 heads, head_dim 128)


def qwen3_config(architecture: str, tokenizer: Tokenizer, **extra: object) -> dict:
    """A Qwen3 config.json at toy size as transformers 5 writes it (`dtype`, `rope_parameters`, `layer_types`)."""
    from transformers import Qwen3Config

    config = Qwen3Config(
        architectures=[architecture],
        vocab_size=EMBED_ROWS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=QWEN3_HEAD_DIM,
        max_position_embeddings=4096,
        rms_norm_eps=1e-06,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
        dtype="bfloat16",
        **extra,
    )
    return config.to_dict()


def _save_qwen3(directory: Path, architecture: str, head: dict[str, tuple[int, ...]], seed: int, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_PLAIN)
    config = qwen3_config(architecture, tokenizer, **extra)
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | head
    save_sharded_safetensors(directory, random_weights(shapes, seed=seed, dtype=torch.bfloat16), shards=2)
    return directory


def build_outcome_qwen3(directory: Path) -> Path:
    """Skywork-Reward-V2-Qwen3 layout: Qwen3ForSequenceClassification, `score.weight` [1, H], no bias."""
    return _save_qwen3(directory, "Qwen3ForSequenceClassification", {"score.weight": (1, HIDDEN)}, seed=11, num_labels=1)


def build_token_classification_qwen3(directory: Path) -> Path:
    """A Qwen3 PRM from TRL's PRMTrainer: Qwen3ForTokenClassification, `score` Linear(H, 2) with a bias."""
    return _save_qwen3(directory, "Qwen3ForTokenClassification", _token_classification_head(HIDDEN), seed=12, num_labels=2)


def build_universal_prm(directory: Path) -> Path:
    """AURORA Universal-PRM-7B as a Qwen2.5 sequence classifier: `score.weight` [1, H], no bias, EOS <|im_end|>."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_qwen_tokenizer(directory, [], CHATML_WITH_DEFAULT_SYSTEM)
    config = qwen2_config("Qwen2ForSequenceClassification", tokenizer, num_labels=1)
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(config) | {"score.weight": (1, HIDDEN)}
    save_sharded_safetensors(directory, random_weights(shapes, seed=13, dtype=torch.bfloat16), shards=2)
    return directory


# InternLM2 chat template (ChatML after the BOS; not confirmed from the reward checkpoints' own files).
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INTERNLM2_SPECIALS = ["<|im_start|>", "<|im_end|>", "[UNUSED_TOKEN_130]"]
INTERNLM2_REWARD_TOKEN = "[UNUSED_TOKEN_130]"  # the reward token the config's reward_token_id names


def internlm2_tensors(llama_weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Llama-named decoder + `score.weight` renamed and packed as InternLM2ForRewardModel stores them:
    `wqkv` rows per KV head are [its q heads, its k head, its v head]; `v_head` the reward head."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    groups = heads // kv
    out = {"model.tok_embeddings.weight": llama_weights["model.embed_tokens.weight"], "model.norm.weight": llama_weights["model.norm.weight"]}
    for i in range(config["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        rows = []
        for h in range(kv):
            for j in range(groups):
                rows.append(llama_weights[q + "q_proj.weight"][(h * groups + j) * d : (h * groups + j + 1) * d])
            rows.append(llama_weights[q + "k_proj.weight"][h * d : (h + 1) * d])
            rows.append(llama_weights[q + "v_proj.weight"][h * d : (h + 1) * d])
        out[p + "attention.wqkv.weight"] = torch.cat(rows).contiguous()
        out[p + "attention.wo.weight"] = llama_weights[q + "o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = llama_weights[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = llama_weights[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = llama_weights[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = llama_weights[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = llama_weights[p + "post_attention_layernorm.weight"]
    out["v_head.weight"] = llama_weights["score.weight"]
    return out


def build_internlm2_reward(directory: Path) -> Path:
    """internlm2-1_8b/7b/20b-reward layout: InternLM2ForRewardModel (model_type internlm2, bias false,
    reward_token_id), packed `wqkv`, `v_head.weight` [1, H]; a sentencepiece-style tokenizer adding BOS,
    ChatML specials and the reward token; sharded safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_style_tokenizer()
    tokenizer.add_special_tokens([_special(s) for s in INTERNLM2_SPECIALS])
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": _added_tokens_decoder(tokenizer, ["<unk>", "<s>", "</s>", *INTERNLM2_SPECIALS]),
            "additional_special_tokens": INTERNLM2_SPECIALS,
            "bos_token": "<s>",
            "chat_template": INTERNLM2_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "</s>",
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(directory / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                                                         "additional_special_tokens": INTERNLM2_SPECIALS})
    assert tokenizer.get_vocab_size() <= EMBED_ROWS
    llama_like = llama_config("LlamaForSequenceClassification", "llama", EMBED_ROWS, bos=1, eos=2)
    config = {
        "architectures": ["InternLM2ForRewardModel"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768,
        "model_type": "internlm2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": 2,
        "reward_token_id": tokenizer.token_to_id(INTERNLM2_REWARD_TOKEN),
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": EMBED_ROWS,
    }
    _write_json(directory / "config.json", config)
    shapes = backbone_tensor_shapes(llama_like) | {"score.weight": (1, HIDDEN)}
    llama_weights = random_weights(shapes, seed=14, dtype=torch.float16)
    save_sharded_safetensors(directory, internlm2_tensors(llama_weights, config), shards=2)
    return directory


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen_prm": build_qwen_prm,
    "qwen_prm_jinja": lambda d: build_qwen_prm(d, template_in_jinja_file=True, with_lm_head=True),
    "qwen_prm_short": lambda d: build_qwen_prm(d, max_positions=512),
    "skywork_prm": build_skywork_prm,
    "math_shepherd": build_math_shepherd,
    "math_shepherd_openr": build_math_shepherd_openr,
    "rlhflow": build_rlhflow,
    "llemma": build_llemma,
    "outcome_qwen": build_outcome_qwen,
    "outcome_llama": build_outcome_llama,
    "token_classification_qwen2": build_token_classification_qwen2,
    "token_classification_llama": build_token_classification_llama,
    "outcome_qwen3": build_outcome_qwen3,
    "token_classification_qwen3": build_token_classification_qwen3,
    "universal_prm": build_universal_prm,
}

# The prmserve format each checkpoint is served with.
FORMAT_OF: dict[str, str] = {
    "qwen_prm": "qwen_prm",
    "qwen_prm_jinja": "qwen_prm",
    "qwen_prm_short": "qwen_prm",
    "skywork_prm": "skywork_prm",
    "math_shepherd": "math_shepherd",
    "math_shepherd_openr": "math_shepherd",
    "rlhflow": "rlhflow",
    "llemma": "llemma",
    "outcome_qwen": "outcome",
    "outcome_llama": "outcome",
    "token_classification_qwen2": "token_classification",
    "token_classification_llama": "token_classification",
    "outcome_qwen3": "outcome",
    "token_classification_qwen3": "token_classification",
    "universal_prm": "universal_prm",
}


def with_config(source: Path, directory: Path, **changes: object) -> Path:
    """A copy of checkpoint `source` with keys of its config.json changed."""
    shutil.copytree(source, directory)
    config = json.loads((source / "config.json").read_text())
    _write_json(directory / "config.json", {**config, **changes})
    return directory


def resaved_by_transformers(source: Path, directory: Path) -> Path:
    """A copy of checkpoint `source` whose config.json the installed transformers re-saves (5.x: `dtype`,
    `rope_parameters`, `layer_types` in place of `torch_dtype`, `rope_theta`/`rope_scaling`); other files kept."""
    from transformers import CONFIG_MAPPING

    shutil.copytree(source, directory)
    model_type = json.loads((source / "config.json").read_text())["model_type"]
    CONFIG_MAPPING[model_type].from_pretrained(source).save_pretrained(directory)
    return directory


def build(name: str, directory: Path | str) -> Path:
    """Write the tiny checkpoint `name` into `directory` (created if needed) and return its path."""
    return BUILDERS[name](Path(directory))

