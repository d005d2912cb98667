"""Typed errors: every way prmserve refuses input says why, in a class the caller can catch."""


class PRMServeError(Exception):
    """Base class of every error prmserve raises on purpose."""


class InvalidInputError(PRMServeError, ValueError):
    """An item cannot be scored as given (no steps, a separator inside a step, ...)."""


class InputTooLongError(InvalidInputError):
    """An item is longer than the model's context or the KV pool can ever hold."""


class FormatError(PRMServeError, ValueError):
    """The PRM format is unknown, cannot be detected, or got an unknown option."""


class CheckpointError(PRMServeError):
    """A checkpoint is missing, malformed, or its tensors do not match the model."""


class QueueFullError(PRMServeError):
    """The engine's queue is at its limit; retry later."""


class RequestCancelledError(PRMServeError):
    """The request was aborted before it finished (client gone, timeout, shutdown)."""


class HandleNotFoundError(PRMServeError, LookupError):
    """A node handle is unknown: never issued, released, expired (`handle_ttl`) or pushed out (`max_handles`)."""


class EngineSleepingError(PRMServeError):
    """The engine is asleep (sleep mode, its memory lent to another program): work is refused until `wake_up`."""


class TensorParallelError(PRMServeError, RuntimeError):
    """Tensor-parallel ranks could not start, or one died (or a step broke their lockstep): load the PRM again."""
