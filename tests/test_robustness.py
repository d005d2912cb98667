"""What a library must not do to its host program, and inputs that once failed in odd ways."""

from __future__ import annotations

import gc

import pytest

import prmserve.engine.loop as loop_module
from prmserve import PRM, cli
from tiny_checkpoints import build


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build("skywork_prm", tmp_path_factory.mktemp("robust") / "skywork_prm")


@pytest.fixture
def freezes(monkeypatch) -> list[int]:
    """Counts `freeze_heap` calls (without freezing the test process's heap)."""
    calls: list[int] = []
    monkeypatch.setattr(loop_module, "freeze_heap", lambda: calls.append(1))
    return calls


def test_building_and_using_a_prm_leaves_the_callers_heap_alone(checkpoint):
    frozen = gc.get_freeze_count()
    prm = PRM(str(checkpoint), device="cpu", num_kv_blocks=64, block_size=4)
    try:
        prm.score([{"problem": "What is 1+2?", "steps": ["1+2=3."]}])
    finally:
        prm.close()
    assert gc.get_freeze_count() == frozen


def test_the_commands_that_own_the_process_freeze_it_once_loaded(checkpoint, freezes, monkeypatch):
    args = cli.build_parser().parse_args(["demo", str(checkpoint), "--device", "cpu"])
    cli.load_prm(args, args.model).close()
    assert freezes == [1]
    import prmserve.server.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "run_server", lambda prm, settings: served.append(len(freezes)))
    assert cli.main(["serve", str(checkpoint), "--device", "cpu"]) == 0
    assert served == [2]  # frozen before serving
