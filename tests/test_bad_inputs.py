"""Every way prmserve refuses bad input or a bad checkpoint raises a typed error that says why."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from prmserve import PRM
from prmserve.errors import CheckpointError, FormatError, InputTooLongError, InvalidInputError
from prmserve.models.loader import resolve_checkpoint
from reference import reference_step_rewards, tokenizer_of
from test_families import CASES, MULTI_STEP, served  # noqa: F401  (a shared session fixture)


def score_one(prm: PRM, problem: str, steps: list[str]) -> list[float]:
    """prmserve's rewards for a single item."""
    return prm.score([{"problem": problem, "steps": steps}])[0].step_rewards


FAMILY_CASES = ["qwen_prm", "skywork_prm", "math_shepherd", "rlhflow", "llemma", "outcome-qwen2_rm"]


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_no_steps(case: str, served) -> None:
    """An item with an empty step list has nothing to score."""
    name, options = CASES[case]
    with pytest.raises(InvalidInputError):
        score_one(served(name, **options), "What is 1 + 1?", [])


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_empty_problem(case: str, served) -> None:
    """An item without a problem is refused rather than scored as a bare solution."""
    name, options = CASES[case]
    with pytest.raises(InvalidInputError):
        score_one(served(name, **options), "", ["1 + 1 = 2"])


@pytest.mark.parametrize(
    ("case", "problem", "steps"),
    [
        ("qwen_prm", "What is 2 + 3?", ["2 + 3 <extra_0> = 5", "The answer is 5"]),
        ("qwen_prm", "What is 2 + 3? <extra_0>", ["2 + 3 = 5"]),
        ("math_shepherd", "What is 2 + 3?", ["2 + 3 = 5 ки and so", "The answer is 5"]),
        ("math_shepherd-openr_qwen", "What is 2 + 3?", ["2 + 3 = 5 \n\n\n\n\n and so", "The answer is 5"]),
        ("llemma", "What is 2 + 3?", ["2 + 3 = 5 ки", "The answer is 5"]),
        ("skywork_prm", "What is 2 + 3?", ["2 + 3 = 5\nso", "The answer is 5"]),
    ],
    ids=["qwen-step", "qwen-problem", "shepherd", "openr", "llemma", "skywork-newline"],
)
def test_separator_inside_the_text(case: str, problem: str, steps: list[str], served) -> None:
    """Text holding the model's step separator would add or shift reward positions: refused."""
    name, options = CASES[case]
    with pytest.raises(InvalidInputError):
        score_one(served(name, **options), problem, steps)


@pytest.mark.parametrize(
    ("new_steps", "message"),
    [([""], "step 2 is empty"), (["2 + 3 <extra_0> = 5"], "step 2 contains"), ([7], "step 2 is a int"),
     ("So 5.", "list of strings")],
    ids=["empty", "separator", "not-a-string", "steps-a-string"],
)
def test_bad_new_steps_after_a_recently_scored_prefix_are_refused(new_steps, message: str, served) -> None:
    """A stateless call re-sending a recent prefix skips re-checking that prefix, never the steps it adds."""
    name, options = CASES["qwen_prm"]
    prm = served(name, **options)
    problem, steps = "What is 2 + 3 + 4?", ["2 + 3 = 5", "5 + 4 = 9"]
    score_one(prm, problem, steps)  # now a recent encoding
    sent = new_steps if isinstance(new_steps, str) else steps + new_steps
    with pytest.raises(InvalidInputError, match=message):
        score_one(prm, problem, sent)


def qwen_prm_length(ckpt: Path, problem: str, steps: list[str]) -> int:
    """Token count of a qwen_prm input, rendered as the reference (the model card) renders it."""
    tokenizer = tokenizer_of(str(ckpt))
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False)))


def test_input_longer_than_the_context(checkpoint, served) -> None:
    """The tiny model's context is 512 positions: 512 tokens are scored, 513 raise InputTooLongError."""
    ckpt = checkpoint("qwen_prm_short")
    assert json.loads((ckpt / "config.json").read_text())["max_position_embeddings"] == 512
    prm = served("qwen_prm_short")
    steps = ["1 + 1 = 2", "The answer is 2"]
    # Each " a" is one more token; find the filler that makes the input exactly 512 tokens.
    base = qwen_prm_length(ckpt, "What is 1 + 1?", steps)
    per_filler = qwen_prm_length(ckpt, "What is 1 + 1?" + " a", steps) - base
    assert per_filler == 1
    fits = "What is 1 + 1?" + " a" * (512 - base)
    assert qwen_prm_length(ckpt, fits, steps) == 512
    assert len(score_one(prm, fits, steps)) == 2
    with pytest.raises(InputTooLongError) as excinfo:
        score_one(prm, fits + " a", steps)
    assert isinstance(excinfo.value, InvalidInputError)
    with pytest.raises(InputTooLongError):
        score_one(prm, "What is 1 + 1?" + " 1 + 1 = 2." * 300, steps)


@pytest.mark.parametrize(
    ("name", "format_name", "options"),
    [
        ("qwen_prm", "qwen_prm", {"bogus": 1}),
        ("skywork_prm", "skywork_prm", {"system_prompt": "hello"}),
        ("math_shepherd", "math_shepherd", {"steptag": "ки"}),
        ("qwen_prm", "no_such_format", {}),
    ],
    ids=["unknown-option", "option-of-another-format", "misspelt-option", "unknown-format"],
)
def test_format_errors(name: str, format_name: str, options: dict, checkpoint) -> None:
    """Unknown format names and options are refused at load time, naming the culprit."""
    with pytest.raises(FormatError) as excinfo:
        PRM(str(checkpoint(name)), format=format_name, device="cpu", dtype="float32", **options)
    culprit = next(iter(options)) if options else format_name
    assert culprit in str(excinfo.value)


def copy_checkpoint(checkpoint: Callable[[str], Path], name: str, tmp_path: Path) -> Path:
    """A private copy of a tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(checkpoint(name), tmp_path / name))


def test_missing_tensor_in_single_file(checkpoint, tmp_path: Path) -> None:
    """A model.safetensors without one backbone tensor: CheckpointError naming it."""
    ckpt = copy_checkpoint(checkpoint, "outcome_llama", tmp_path)
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        PRM(str(ckpt), format="outcome", device="cpu", dtype="float32")


def test_missing_head_tensor_in_shards(checkpoint, tmp_path: Path) -> None:
    """A sharded checkpoint (shard and index agreeing) without the head's bias: CheckpointError naming it."""
    ckpt = copy_checkpoint(checkpoint, "qwen_prm", tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = ckpt / index["weight_map"].pop("score.2.bias")
    weights = load_file(shard)
    del weights["score.2.bias"]
    save_file(weights, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"score\.2\.bias"):
        PRM(str(ckpt), format="qwen_prm", device="cpu", dtype="float32")


def test_unexpected_tensor_in_pytorch_bin(checkpoint, tmp_path: Path) -> None:
    """A pytorch_model.bin with a tensor the model does not have: CheckpointError naming it."""
    ckpt = copy_checkpoint(checkpoint, "skywork_prm", tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(4)
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.rotary_extra\.weight"):
        PRM(str(ckpt), format="skywork_prm", device="cpu", dtype="float32")


def test_hub_id_goes_through_snapshot_download(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub ID is fetched with huggingface_hub.snapshot_download(repo_id=...), then loaded like a local dir."""
    local = checkpoint("qwen_prm")
    calls: list[dict] = []

    def fake_snapshot_download(*args: object, **kwargs: object) -> str:
        calls.append({"args": args, **kwargs})
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint("Qwen/Qwen2.5-Math-PRM-7B") == local
    assert calls[-1]["repo_id"] == "Qwen/Qwen2.5-Math-PRM-7B"

    prm = PRM("Qwen/Qwen2.5-Math-PRM-7B", device="cpu", dtype="float32")
    try:
        got = score_one(prm, *MULTI_STEP)
    finally:
        prm.close()
    assert len(calls) == 2
    want = reference_step_rewards("qwen_prm", local, *MULTI_STEP)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_local_directory_skips_the_hub(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing local directory is used as is, never looked up on the hub."""

    def no_network(*args: object, **kwargs: object) -> str:
        raise AssertionError("snapshot_download called for a local directory")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_checkpoint(str(checkpoint("qwen_prm"))) == checkpoint("qwen_prm")


def test_legacy_pytorch_bin_loads_without_mmap(checkpoint, tmp_path: Path) -> None:
    """A pre-1.6 (non-zip) pytorch_model.bin cannot be memory-mapped: it is read whole, still tensors only."""
    ckpt = copy_checkpoint(checkpoint, "skywork_prm", tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    prm = PRM(str(ckpt), format="skywork_prm", device="cpu", dtype="float32")
    try:
        got = score_one(prm, *MULTI_STEP)
    finally:
        prm.close()
    want = reference_step_rewards("skywork_prm", checkpoint("skywork_prm"), *MULTI_STEP)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_pickled_code_in_pytorch_bin_is_refused_with_a_conversion_hint(checkpoint, tmp_path: Path) -> None:
    """A .bin whose pickle references code: never loaded; the error says how to convert it, not to unpickle it."""
    ckpt = copy_checkpoint(checkpoint, "skywork_prm", tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["hook"] = json.dumps  # pickled by reference: loading it would import and call code
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles code") as refused:
        PRM(str(ckpt), format="skywork_prm", device="cpu", dtype="float32")
    assert "save_file as model.safetensors" in str(refused.value) and "Re-running" not in str(refused.value)
