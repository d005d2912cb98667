"""Sleep mode's memory moves (vLLM's levels): weights to pinned host memory (level 1) or dropped (level 2),
and the measure of what a sleep gave back, so a generator can use the GPU meanwhile (RL colocated mode)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

SLEEP_LEVELS = (1, 2)


@dataclass(frozen=True)
class SleepReport:
    """What `sleep` gave back: `freed_bytes` measured as `measured_by` says (the device's used memory before
    less after, by `torch.cuda.mem_get_info`, on CUDA; the KV pool's bytes, and the weights' at level 2, on CPU)."""

    level: int
    freed_bytes: int
    measured_by: str
    seconds: float


def device_memory_in_use(device: torch.device) -> int | None:
    """Bytes in use on a CUDA device by every process, after returning this one's cached blocks; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def offload_weights(model: nn.Module) -> int:
    """Level 1: every parameter and buffer to host memory (pinned on a CUDA machine, so waking copies fast); 0 bytes
    dropped. The tensors keep their identity, so compiled code holding them stays valid."""
    pin = torch.cuda.is_available()
    for _, tensor in _tensors(model):
        if tensor.device.type != "cpu":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            host.copy_(tensor.data)
            tensor.data = host
    return 0


def restore_weights(model: nn.Module, device: torch.device) -> None:
    """Undo `offload_weights`: every parameter and buffer back on `device`."""
    for _, tensor in _tensors(model):
        tensor.data = tensor.data.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_weights(model: nn.Module) -> int:
    """Level 2: let the parameters go (buffers, e.g. rotary frequencies, move to host memory); bytes dropped."""
    dropped = 0
    for _, param in model.named_parameters():
        dropped += param.numel() * param.element_size()
        param.data = torch.empty(0, dtype=param.dtype)
    for _, buffer in model.named_buffers():
        buffer.data = buffer.data.cpu()
    return dropped


def refill_weights(model: nn.Module, fresh: nn.Module, device: torch.device) -> None:
    """Wake from level 2: take the parameters of `fresh` (the same checkpoint, loaded again) into `model`'s
    own tensors; the buffers go back to `device`."""
    loaded = dict(fresh.named_parameters())
    for name, param in model.named_parameters():
        param.data = loaded[name].data
    for _, buffer in model.named_buffers():
        buffer.data = buffer.data.to(device)
