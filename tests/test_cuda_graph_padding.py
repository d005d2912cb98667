"""The padded forward that CUDA graphs capture computes what the plain step computes, on the CPU too:
a padding sequence in scratch slots, empty sequence entries and unread filler keys change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prmserve import PRM
from prmserve.engine.cuda_graphs import StepArrays, layout, pad, padded_forward, shape_for
from tiny_checkpoints import build

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    made = PRM(str(build("qwen_prm", tmp_path_factory.mktemp("graphs") / "q")), device="cpu", num_kv_blocks=64)
    yield made
    made.close()


def test_shapes_round_up_and_refuse_big_steps() -> None:
    step = StepArrays(np.zeros(20, np.int64), np.zeros(20, np.int64), np.zeros(20, np.int64), np.zeros(900, np.int64), [20], [900])
    assert shape_for(step, max_seqs=8) == (32, 1024, 8)  # 900 keys + 12 padding keys; 8 sequence entries at most
    big = StepArrays(*(np.zeros(3000, np.int64) for _ in range(4)), [3000], [3000])
    assert shape_for(big, max_seqs=8) is None
    many = StepArrays(*(np.zeros(9, np.int64) for _ in range(4)), [1] * 9, [1] * 9)
    assert shape_for(many, max_seqs=8) is None
    assert shape_for(StepArrays(*(np.zeros(40, np.int64) for _ in range(4)), [4] * 10, [4] * 10), max_seqs=256) == (48, 1024, 16)
    assert shape_for(StepArrays(*(np.zeros(70, np.int64) for _ in range(4)), [1] * 70, [1] * 70), max_seqs=256) == (80, 1024, 256)


def test_sequence_buckets_cover_every_count_a_step_can_have() -> None:
    """A step of n tokens has at most n sequences: some captured graph holds every (tokens, sequences) pair."""
    from prmserve.engine.cuda_graphs import TOKEN_BUCKETS, seq_buckets, valid_shapes

    assert seq_buckets(256) == [16, 64, 256] and seq_buckets(10) == [10] and seq_buckets(20) == [16, 20]
    shapes = set(valid_shapes(256))
    for tokens in TOKEN_BUCKETS:
        for count in (1, 5, 17, 65, 256):
            if count <= tokens:
                step = StepArrays(*(np.zeros(tokens, np.int64) for _ in range(4)), [1] * count, [1] * count)
                assert shape_for(step, max_seqs=256) in shapes
    assert (16, 1024, 64) not in shapes  # 16 tokens never make 17 or more sequences


def test_padded_inputs_layout() -> None:
    step = StepArrays(np.array([5, 6, 7]), np.array([10, 11, 0]), np.array([40, 41, 60]), np.arange(13), [2, 1], [12, 1])
    packed = pad(step, tokens=16, keys=64, seqs=4, scratch=1000)
    ids, positions, slots, keys, cu_q, cu_k = np.split(packed, np.cumsum(layout(16, 64, 4))[:-1])
    assert ids[:3].tolist() == [5, 6, 7] and not ids[3:].any()
    assert slots[3:].tolist() == list(range(1000, 1013))  # padding tokens write scratch slots only
    assert cu_q.tolist() == [0, 2, 3, 16, 16, 16] and cu_k.tolist() == [0, 12, 13, 26, 26, 26]
    assert keys[13:26].tolist() == list(range(1000, 1013)) and set(keys[26:]) == {1000}


def test_padded_forward_writes_what_the_plain_step_writes(prm) -> None:
    from prmserve.engine import Request
    from prmserve.engine.scheduler import ScheduledChunk

    runner, blocks = prm.engine.runner, prm.engine.blocks
    item = {"problem": "Tom has 3 apples and buys 2 more. How many does he have now?", "steps": ["3 + 2 = 5.", "He has 5."]}
    prm.score([item])  # its full blocks stay in the prefix cache
    encoded = prm.encode(item)
    request = Request("probe", encoded.token_ids, encoded.read_positions)
    match = blocks.match_prefix(request, step=-1)
    start, end = len(match.block_ids) * blocks.block_size, len(encoded.token_ids)
    assert 0 < start < end
    blocks.allocate(request, match)
    slots = [blocks.slot(request, p) for p in range(start, end)]
    keys = [blocks.slot(request, p) for p in range(end)]
    runner.run([ScheduledChunk(request, start, end)])  # the plain step, after the cached prefix
    want = runner.head_cache[slots].clone()
    runner.head_cache[slots] = 0.0
    step = StepArrays(np.array(encoded.token_ids[start:end]), np.arange(start, end), np.array(slots), np.array(keys),
                      [end - start], [end])
    tokens, key_count, seqs = shape_for(step, max_seqs=4)
    packed = torch.from_numpy(pad(step, tokens, key_count, seqs, runner.scratch))
    padded_forward(prm.model, runner.kv_cache, runner.head_cache, packed, tokens, key_count, seqs)
    torch.testing.assert_close(runner.head_cache[slots], want, atol=1e-5, rtol=0)
    assert want.abs().sum() > 0
    blocks.release(request)


def test_every_captured_shape_can_be_padded_to() -> None:
    """Capture pads an all-padding step into each shape: every shape must hold its own padding."""
    from prmserve.engine.cuda_graphs import valid_shapes

    empty = StepArrays(*(np.zeros(0, np.int64) for _ in range(4)), [], [])
    for tokens, keys, seqs in valid_shapes(256):
        assert len(pad(empty, tokens, keys, seqs, scratch=10)) == sum(layout(tokens, keys, seqs))
