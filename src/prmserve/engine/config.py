"""The engine's settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Scheduling and memory limits of one engine.

    KV pool size: `num_kv_blocks` when given, else `gpu_memory_utilization` of the GPU's memory
    (less what is already used) on CUDA, else `kv_cache_gb` on the CPU.
    """

    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 256
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.85
    kv_cache_gb: float = 1.0
    num_kv_blocks: int | None = None
    max_queue: int | None = None
    max_pinned_fraction: float = 0.5  # share of the KV pool that kept tree-search nodes may hold

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (1 <= self.block_size <= 16, "block_size must be between 1 and 16 (steps are short)"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]"),
            (self.kv_cache_gb > 0, "kv_cache_gb must be > 0"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"),
            (self.max_queue is None or self.max_queue >= 1, "max_queue must be >= 1"),
            (0.0 <= self.max_pinned_fraction <= 1.0, "max_pinned_fraction must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
