"""The prefill-only scoring engine: priority scheduling, paged KV, a prefix cache that keeps head outputs."""

from prmserve.engine.config import EngineConfig
from prmserve.engine.engine import Engine, EngineStats, StepStats
from prmserve.engine.loop import EngineLoop
from prmserve.engine.request import Request

__all__ = ["Engine", "EngineConfig", "EngineLoop", "EngineStats", "Request", "StepStats"]
