"""A worker process (ranks 1..N-1): join the group, load this rank's shard, then run each step rank 0 sends.

Rank 0 talks to a worker through two pipes: commands in (`cache`, `step`, `stop`), reports out (`connected`,
`ready`, `error`). A worker waits for its next command on the pipe, never inside a collective, so an idle
server has no timeout to hit; when rank 0's process is gone the pipe closes and the worker exits.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec
from prmserve.models.loader import load_reward_model
from prmserve.models.transformer import RewardModel
from prmserve.parallel.group import LOCALHOST, GROUP_TIMEOUT, join_group, leave_group
from prmserve.parallel.step import receive_step


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build its part of the model (picklable: it crosses to a spawned process)."""

    checkpoint: Path
    config: BackboneConfig
    head: HeadSpec
    device_type: str  # "cpu" or "cuda"
    first_device: int  # rank r runs on cuda:(first_device + r)
    dtype: torch.dtype
    world_size: int
    store_port: int  # rank 0's TCPStore
    compile: bool  # torch.compile the layers, as rank 0 does
    num_threads: int  # torch's intra-op threads, as rank 0 has
    attention_backend: str  # rank 0's choice (`choose_backend`)

    def device(self, rank: int) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device("cuda", self.first_device + rank)


def run_worker(rank: int, spec: WorkerSpec, commands: Connection, reports: Connection) -> None:
    """The worker process's main function (the target rank 0 spawns)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 says when to stop
    device = spec.device(rank)
    code = 0
    try:
        torch.set_num_threads(spec.num_threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        reports.send(("connected", None))
        store = dist.TCPStore(LOCALHOST, spec.store_port, spec.world_size, is_master=False, timeout=GROUP_TIMEOUT)
        tp = join_group(store, rank, spec.world_size, device)
        model = load_reward_model(spec.checkpoint, spec.config, spec.head, device, spec.dtype, tp)
        model.set_attention_kernel(spec.attention_backend)
        if spec.compile:
            model.compile_layers()
        reports.send(("ready", torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None))
        serve(model, commands)
    except EOFError:  # rank 0 is gone: nothing left to compute for
        pass
    except BaseException as exc:
        code = 1
        traceback.print_exc()
        try:
            reports.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:  # rank 0 is gone too
            pass
    finally:
        leave_group()
    # Nothing is left to flush or free: skip the interpreter's teardown (about a second with torch loaded).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@torch.inference_mode()
def serve(model: RewardModel, commands: Connection) -> None:
    """Run rank 0's commands until `stop`: `cache` allocates this rank's KV pool, `step` runs one forward."""
    param = next(model.parameters())
    kv_cache: torch.Tensor | None = None
    while True:
        kind, payload = commands.recv()
        if kind == "stop":
            return
        if kind == "cache":
            kv_cache = None  # a new pool replaces the old one: free that first
            cfg = model.config
            shape = (cfg.num_layers, 2, payload, model.num_kv_heads, cfg.head_dim)
            kv_cache = torch.empty(shape, dtype=param.dtype, device=param.device)
        elif kind == "step":
            assert kv_cache is not None, "rank 0 sends the KV pool's size before any step"
            model.hidden_states(*receive_step(payload, kv_cache))
        else:
            raise ValueError(f"unknown command {kind!r} from rank 0")
