"""Tensor parallelism on the CPU: two gloo ranks (this process and one worker it spawns) score as one.

Every backbone prmserve loads gives the same rewards at tensor_parallel_size 2 as at 1 (float32, 1e-5),
cached prefixes and children extended from a kept node included (their prefix read back from both ranks'
KV pools). Each rank holds, and reads from disk, only its part of the split tensors. A dead worker is a
TensorParallelError, not a hang; a size that does not split the model is refused before anything starts.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from prmserve import PRM, cli
from prmserve.errors import InvalidInputError, TensorParallelError
from prmserve.models.loader import CheckpointTensors, load_reward_model
from prmserve.parallel.group import TensorParallelGroup
from prmserve.parallel.worker import WorkerSpec
from prmserve.parallel.workers import TensorParallelWorkers
from tiny_checkpoints import BUILDERS, FORMAT_OF, build_internlm2_reward

TOLERANCE = 1e-5
BACKBONES = {  # tiny checkpoint: what it exercises besides its backbone's layers
    "qwen_prm": "Qwen2: q/k/v biases, MLP head, sharded safetensors",
    "rlhflow": "Llama: llama3 rope scaling, LM-row head",
    "math_shepherd": "Mistral: LM-row head, one safetensors file",
    "token_classification_qwen3": "Qwen3: per-head q/k norms, head_dim != hidden / heads",
    "internlm2_reward": "InternLM2: packed wqkv split by KV-head group, outcome head",
}
PROBLEM = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. How much?"
NODE = ["Step 1: She eats 3 eggs, so 16 - 3 = 13 eggs remain.", "Step 2: She bakes with 4, so 13 - 4 = 9 remain."]
CHILDREN = [["Step 3: She sells 9 eggs at $2 each: 9 * 2 = 18."], ["Step 3: 9 * 3 = 27.", "The answer is 27."]]
ITEMS = [
    {"problem": PROBLEM, "steps": NODE},
    {"problem": "What is 7 + 8?", "steps": ["7 + 8 = 15, so the answer is 15."]},
    {"problem": "Résoudre x² = 4. 求解。", "steps": ["x = 2 ou x = −2 ✓", "所以答案是 2"]},
]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(checkpoint, tmp_path_factory) -> dict[str, Path]:
    built = {name: checkpoint(name) for name in [*BACKBONES, "skywork_prm"] if name in BUILDERS}
    built["internlm2_reward"] = build_internlm2_reward(tmp_path_factory.mktemp("tp") / "internlm2_reward")
    return built


def load(path: Path, **options) -> PRM:
    options.setdefault("format", FORMAT_OF.get(path.name, "outcome"))
    return PRM(str(path), device="cpu", dtype="float32", **options)


def rewards(results) -> list[list[float]]:
    return [r.step_rewards for r in results]


def assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert [len(r) for r in got] == [len(r) for r in want]
    error = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert error <= TOLERANCE, f"max |tp2 - tp1| = {error:.3g}\ntp2 {got}\ntp1 {want}"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_two_ranks_score_as_one(name: str, checkpoints) -> None:
    with load(checkpoints[name]) as one, load(checkpoints[name], tensor_parallel_size=2) as two:
        assert len(two.workers.processes) == 1 and two.model.num_kv_heads * 2 == two.config.num_kv_heads
        assert_close(rewards(two.score(ITEMS)), rewards(one.score(ITEMS)))
        again = two.score(ITEMS)  # now read through the prefix cache: KV that both ranks wrote
        assert all(r.usage.cached_tokens > 0 for r in again)
        assert_close(rewards(again), rewards(one.score(ITEMS)))
        if not two.format.extendable:
            return
        node = two.score([{"problem": PROBLEM, "steps": NODE}], keep=True)[0]
        kids = two.extend(node.handle, CHILDREN)
        assert all(kid.usage.cached_tokens > 0 for kid in kids)
        want = one.score([{"problem": PROBLEM, "steps": NODE + new} for new in CHILDREN])
        assert_close(rewards(kids), rewards(want))


def merged(name: str, parts: list[torch.Tensor], q_rows: int) -> torch.Tensor:
    """The whole parameter from the ranks' parts, by the split's definition: each rank holds its heads' rows of q,
    k and v (`q_rows` of q), its rows of gate and of up, its columns of o_proj and down_proj."""
    if "qkv_proj" in name:
        kv_rows = (len(parts[0]) - q_rows) // 2
        pieces = [p.split([q_rows, kv_rows, kv_rows]) for p in parts]
        return torch.cat([piece[i] for i in range(3) for piece in pieces])
    if "gate_up_proj" in name:
        halves = [p.chunk(2) for p in parts]
        return torch.cat([h[i] for i in range(2) for h in halves])
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", ["qwen_prm", "skywork_prm", "internlm2_reward"])
def test_each_rank_reads_and_holds_only_its_part(name: str, checkpoints, monkeypatch) -> None:
    """Safetensors shards, a pytorch_model.bin and InternLM2's packed wqkv, loaded as ranks 0 and 1 of 2 in this process."""
    with load(checkpoints[name]) as one:
        full = dict(one.model.named_parameters())
        cfg, head = one.config, one.format.head
    whole_reads: list[str] = []
    get = CheckpointTensors.get
    monkeypatch.setattr(CheckpointTensors, "get", lambda self, n: whole_reads.append(n) or get(self, n))
    ranks, reads = [], []
    for rank in range(2):
        whole_reads.clear()
        model = load_reward_model(checkpoints[name], cfg, head, torch.device("cpu"), torch.float32, TensorParallelGroup(rank, 2))
        ranks.append(dict(model.named_parameters()))
        reads.append(list(whole_reads))
        assert (model.head is None) == (rank == 1)
    split = ("proj", "wqkv", "wo", "feed_forward.w")
    for rank, names in enumerate(reads):
        assert not [n for n in names if any(s in n for s in split) and "norm" not in n], "a split tensor was read whole"
        assert rank == 0 or not [n for n in names if n.startswith(("score", "v_head", "lm_head"))], "a worker read the head"
    q_rows = cfg.num_heads // 2 * cfg.head_dim
    for param, value in full.items():
        if param.startswith("head."):
            assert torch.equal(ranks[0][param], value) and param not in ranks[1]
        elif ranks[0][param].shape == value.shape:  # held whole by every rank: embeddings, norms
            assert torch.equal(ranks[0][param], value) and torch.equal(ranks[1][param], value), param
        else:
            assert ranks[0][param].numel() * 2 == value.numel(), param
            assert torch.equal(merged(param, [ranks[0][param], ranks[1][param]], q_rows), value), param


def call_with_deadline(fn, seconds: float):
    """fn()'s result or exception, or a test failure if it takes longer than `seconds` (a hang)."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(_run(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return outcome


def _run(fn) -> dict:
    try:
        return {"result": fn()}
    except Exception as exc:
        return {"error": exc}


def test_a_dead_worker_is_an_error_not_a_hang(checkpoints) -> None:
    with load(checkpoints["qwen_prm"], tensor_parallel_size=2) as prm:
        prm.score(ITEMS[:1])
        worker = prm.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        outcome = call_with_deadline(lambda: prm.score(ITEMS[1:]), 30)
        assert isinstance(outcome.get("error"), TensorParallelError), outcome
        assert f"worker rank 1 (pid {worker.pid}) died, killed by SIGKILL" in str(outcome["error"])
        with pytest.raises(TensorParallelError, match="load it again"):  # and it stays broken
            prm.score(ITEMS[:1])
    with pytest.raises(TensorParallelError, match="closed"):
        prm.score(ITEMS[:1])


def test_a_worker_that_fails_to_start_says_why(checkpoints) -> None:
    """A worker whose set-up raises (here: 0 torch threads): its own error reaches rank 0 as a TensorParallelError."""
    with load(checkpoints["qwen_prm"]) as one:
        spec = WorkerSpec(one.path, one.config, one.format.head, "cpu", 0, torch.float32, 2, 1, False, num_threads=0,
                          attention_backend="TORCH_SDPA")
    workers = TensorParallelWorkers.spawn(spec, store=None)
    try:
        outcome = call_with_deadline(lambda: workers.wait_for("connected"), 60)
        assert isinstance(outcome.get("error"), TensorParallelError), outcome
        assert "worker rank 1 failed: RuntimeError: set_num_threads expects a positive integer" in str(outcome["error"])
    finally:
        workers.close()
    assert workers.processes[0].exitcode == 1


@pytest.mark.parametrize(("size", "message"), [
    (3, r"tensor_parallel_size 3 does not divide this model \(num_attention_heads 4, num_key_value_heads 2, "
        r"intermediate_size 128\).*sizes that work: 1, 2"),
    (0, "must be a positive integer, not 0"),
    ("2", "must be a positive integer, not '2'"),
])
def test_a_size_that_does_not_split_the_model_is_refused(size, message: str, checkpoints) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load(checkpoints["qwen_prm"], tensor_parallel_size=size)


def test_an_implicit_prm_is_not_split_yet(checkpoint) -> None:
    """Two models in one engine (EurusPRM's policy and reference): refused before any worker starts."""
    causal = checkpoint("math_shepherd_openr")
    with pytest.raises(InvalidInputError, match="cannot split an implicit PRM"):
        load(causal, format="implicit_prm", reference_model=str(causal), tensor_parallel_size=2)


def test_serve_refuses_such_a_size_in_one_line(checkpoints, capsys) -> None:
    assert cli.main(["serve", str(checkpoints["qwen_prm"]), "--device", "cpu", "-tp", "3"]) == 1
    err = capsys.readouterr().err
    assert "tensor_parallel_size 3 does not divide this model" in err and err.count("\n") == 1, err
