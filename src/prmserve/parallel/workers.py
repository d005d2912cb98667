"""Rank 0's side of the worker processes: spawn them, send each step, and turn a death into a clear error."""

from __future__ import annotations

import signal
import threading
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

from prmserve.errors import TensorParallelError
from prmserve.models.attention import AttentionInputs
from prmserve.models.transformer import RewardModel
from prmserve.parallel.group import leave_group
from prmserve.parallel.step import broadcast_step, pack_step
from prmserve.parallel.worker import WorkerSpec, run_worker

STOP_TIMEOUT_S = 10.0  # how long `close` lets a worker finish before killing it
DEATH_GRACE_S = 1.0  # after a failed collective, how long to wait for the worker behind it to be reaped


class TensorParallelWorkers:
    """The processes of ranks 1..N-1 of one model, as rank 0 sees them.

    Once a worker has died, or a step failed half-way (the ranks are then out of step), every later step
    raises `TensorParallelError`: close the PRM and load it again.
    """

    def __init__(
        self, processes: list[BaseProcess], commands: list[Connection], reports: list[Connection], store: dist.Store | None
    ) -> None:
        self.processes = processes
        self.free_memory: list[int | None] = []  # each worker's free GPU memory once loaded (None on CPU)
        self._commands, self._reports = commands, reports
        self._store = store  # rank 0's TCPStore: the group's rendezvous, kept alive with it
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._finalizer = weakref.finalize(self, _shut_down, processes, commands, reports, self._closing)

    @classmethod
    def spawn(cls, spec: WorkerSpec, store: dist.Store | None) -> "TensorParallelWorkers":
        """Start ranks 1..world_size-1, each in a fresh interpreter (spawn: CUDA cannot be forked)."""
        context = torch.multiprocessing.get_context("spawn")
        processes, commands, reports = [], [], []
        for rank in range(1, spec.world_size):
            command_reader, command_writer = context.Pipe(duplex=False)
            report_reader, report_writer = context.Pipe(duplex=False)
            # daemon: at interpreter exit multiprocessing ends them even if nobody closed the PRM
            process = context.Process(target=run_worker, args=(rank, spec, command_reader, report_writer),
                                      name=f"prmserve-tp-rank{rank}", daemon=True)
            process.start()
            command_reader.close()  # the worker's ends: closed here, so a dead worker reads as EOF
            report_writer.close()
            processes.append(process)
            commands.append(command_writer)
            reports.append(report_reader)
        return cls(processes, commands, reports, store)

    def wait_for(self, kind: str) -> list[Any]:
        """Each worker's next report, which must be `kind`; TensorParallelError as soon as one fails or exits."""
        got: dict[int, Any] = {}
        while len(got) < len(self.processes):
            pending = [i for i in range(len(self.processes)) if i not in got]
            wait([self._reports[i] for i in pending] + [self.processes[i].sentinel for i in pending])
            for i in pending:
                report = self._read_report(i)
                if report is None:
                    if not self.processes[i].is_alive():
                        raise TensorParallelError(self._death(i))
                    continue
                if report[0] != kind:
                    raise TensorParallelError(f"tensor-parallel worker rank {i + 1} failed: {report[1]}")
                got[i] = report[1]
        return [got[i] for i in range(len(self.processes))]

    def allocate_cache(self, slots: int) -> None:
        """Have every worker allocate its KV pool of `slots` slots (its own KV heads' share)."""
        self._send(("cache", slots))

    def run_step(self, model: RewardModel, input_ids: torch.Tensor, positions: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """One forward on every rank: the step goes to the workers, then through rank 0's own part of the model."""
        self.check()
        header, packed = pack_step(input_ids, positions, inputs)
        try:
            self._send(("step", header))
            broadcast_step(packed)
            return model(input_ids, positions, inputs)
        except TensorParallelError:
            raise
        except Exception as exc:
            raise TensorParallelError(self._fail(f"a step failed on rank 0 ({type(exc).__name__}: {exc})")) from exc

    def check(self) -> None:
        """Raise TensorParallelError if a worker has died or an earlier step broke the ranks' lockstep."""
        if self._closing.is_set():
            raise TensorParallelError("this tensor-parallel PRM is closed: its workers are stopped")
        if self._failure is None and any(p.exitcode is not None for p in self.processes):
            self._fail("a worker exited")
        if self._failure is not None:
            raise TensorParallelError(self._failure)

    def watch(self) -> None:
        """Notice a worker's death at once, even while rank 0 waits inside a collective (NCCL would wait for
        its timeout): record it and abort the group, so the waiting collective fails instead."""
        threading.Thread(target=self._watch, name="prmserve-tp-watchdog", daemon=True).start()

    def close(self) -> None:
        """Stop the workers (killed at once after a failure, else let go within STOP_TIMEOUT_S) and leave the group."""
        if self._failure is not None:
            for process in self.processes:
                process.kill()
        self._finalizer()

    def _watch(self) -> None:
        wait([p.sentinel for p in self.processes])
        if self._closing.is_set():
            return
        self._fail("a worker exited")
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None and dist.is_initialized() and dist.get_backend() == "nccl":
            abort()

    def _send(self, message: tuple[str, Any]) -> None:
        for i, conn in enumerate(self._commands):
            try:
                conn.send(message)
            except OSError:  # the worker's end is closed: it died
                raise TensorParallelError(self._fail(f"worker rank {i + 1} stopped reading")) from None

    def _fail(self, cause: str) -> str:
        """Record the first failure (a dead worker's exit and last words, else `cause`) and say what it means."""
        with self._lock:
            if self._failure is None:
                # A failed collective can come before the worker behind it has exited; an exited one may not be reaped yet.
                exited = wait([p.sentinel for p in self.processes], DEATH_GRACE_S)
                dead = [i for i, p in enumerate(self.processes) if p.sentinel in exited]
                for i in dead:
                    self.processes[i].join()
                why = "; ".join(self._death(i) for i in dead) or f"{cause}; the ranks are out of step"
                self._failure = f"tensor parallelism is broken: {why}. Close this PRM and load it again"
            return self._failure

    def _death(self, i: int) -> str:
        """How worker i ended (it has), with the error it reported if any."""
        process = self.processes[i]
        code = process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        report = self._read_report(i)
        said = f": {report[1]}" if report is not None and report[0] == "error" else ""
        return f"worker rank {i + 1} (pid {process.pid}) died, {how}{said}"

    def _read_report(self, i: int) -> tuple[str, Any] | None:
        """Worker i's next report if one is waiting; None if none is, or its pipe is closed."""
        conn = self._reports[i]
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return None


def _shut_down(processes: list[BaseProcess], commands: list[Connection], reports: list[Connection], closing: threading.Event) -> None:
    """Stop the workers and leave the group (PRM.close, garbage collection or interpreter exit, whichever first)."""
    closing.set()
    for conn in commands:
        try:
            conn.send(("stop", None))
        except OSError:
            pass
    for process in processes:
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in commands + reports:
        conn.close()
    leave_group()
