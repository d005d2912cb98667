"""Reading finished requests' head outputs without waiting for steps launched after theirs.

When the queue alone fills the next step, the engine launches it behind the one still on the GPU (`Engine.make_way`),
so the GPU never idles while the host schedules. A caller that read its outputs on the launching stream would then
wait for that later step too; `reading` moves the caller's GPU work to a side stream that waits only for the
steps that produced these outputs (`Request.ready`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch

from prmserve.engine.request import Request


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@contextlib.contextmanager
def reading(requests: Sequence[Request]) -> Iterator[None]:
    """GPU work in this block (rewards from `outputs`, their copy to the host) waits only for these requests' steps."""
    events = {id(r.ready): r.ready for r in requests if r.ready is not None}
    if not events:  # CPU, or outputs from no step in flight
        yield
        return
    stream = _side_stream(requests[0].outputs.device)
    for event in events.values():
        stream.wait_event(event)
    for request in requests:
        request.outputs.record_stream(stream)  # its memory is not reused by the engine's stream while this reads it
    with torch.cuda.stream(stream):
        yield
