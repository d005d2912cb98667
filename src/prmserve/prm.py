"""`PRM`: load a process reward model and score (problem, steps) items, offline or from async code."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

import torch

from prmserve.engine import Engine, EngineConfig, EngineLoop, Request
from prmserve.errors import CheckpointError, FormatError, InputTooLongError, InvalidInputError
from prmserve.formats import EncodedItem, detect_format, make_format
from prmserve.models import BackboneConfig, load_reward_model, resolve_checkpoint
from prmserve.models.attention import varlen_available
from prmserve.models.loader import CheckpointTensors
from prmserve.results import ScoreResult
from prmserve.tokenizer import load_tokenizer

BUNDLED_MODEL = Path(__file__).parent / "bundled" / "small-prm"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ENGINE_OPTIONS = set(EngineConfig.__dataclass_fields__)


class PRM:
    """A process reward model ready to score: its format, weights, tokenizer and engine.

    `PRM()` loads the small model bundled with prmserve; otherwise pass a local checkpoint
    directory or a Hugging Face model ID. On CUDA the layers are compiled unless `enforce_eager`.
    Keyword options are the engine's (`EngineConfig`: `enable_prefix_caching`,
    `max_num_batched_tokens`, ...) and then the format's.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        format: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        enforce_eager: bool = False,
        **options: Any,
    ) -> None:
        self.model_name = str(model) if model is not None else "prmserve/small-prm"
        if model is None and not (BUNDLED_MODEL / "config.json").is_file():
            raise CheckpointError(f"the bundled model is missing from this installation ({BUNDLED_MODEL}); pass a model")
        self.path = resolve_checkpoint(model if model is not None else BUNDLED_MODEL)
        self.config = BackboneConfig.from_file(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = _resolve_dtype(dtype, self.config, self.device)
        engine_options = {k: options.pop(k) for k in list(options) if k in _ENGINE_OPTIONS}
        self.format_name = format or detect_format(self.config, _tensor_names_if_needed(self.path, self.config))
        self.format = make_format(self.format_name, self.tokenizer, self.config, **options)
        self.model = load_reward_model(self.path, self.config, self.format.head, self.device, self.dtype)
        self.model.set_attention_kernel(varlen_available(self.device, self.dtype))
        if self.device.type == "cuda" and not enforce_eager:
            self.model.compile_layers()  # fuses norms, rotary, SwiGLU; measured in bench/
        self.engine = Engine(self.model, EngineConfig(**engine_options))
        self._loop: EngineLoop | None = None

    @property
    def max_model_len(self) -> int:
        """Longest input accepted: the model's context, bounded by what the KV pool can hold."""
        return min(self.config.max_position_embeddings, self.engine.max_tokens_per_request)

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet finished (0 before the engine thread starts)."""
        return self._loop.num_pending if self._loop is not None else 0

    @property
    def loop(self) -> EngineLoop:
        """The engine thread, started on first use."""
        if self._loop is None:
            self._loop = EngineLoop(self.engine)
        return self._loop

    def encode(self, item: Mapping[str, Any]) -> EncodedItem:
        """Token ids and read positions for one item: {problem, steps}, or pre-formatted {text} / {token_ids}."""
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"an item must be a mapping with 'problem' and 'steps', not {type(item).__name__}")
        kinds = [k for k in ("steps", "text", "token_ids") if k in item]
        if len(kinds) != 1:
            raise InvalidInputError("an item needs exactly one of: problem + steps, text, token_ids")
        if kinds[0] == "steps":
            encoded = self.format.encode(item.get("problem"), item["steps"])
        elif kinds[0] == "text":
            if not isinstance(item["text"], str) or not item["text"]:
                raise InvalidInputError("'text' must be a non-empty string")
            encoded = self.format.encode_text(item["text"])
        else:
            encoded = self.format.encode_token_ids(self._checked_ids(item["token_ids"]))
        if not encoded.read_positions:
            raise InvalidInputError(f"the input has no step to score (no {self.format_name} separator found)")
        if len(encoded.token_ids) > self.max_model_len:
            raise InputTooLongError(f"the input is {len(encoded.token_ids)} tokens; this model takes at most {self.max_model_len}")
        return encoded

    def _checked_ids(self, token_ids: Any) -> list[int]:
        vocab = self.config.vocab_size
        if not isinstance(token_ids, Sequence) or isinstance(token_ids, str) or not token_ids:
            raise InvalidInputError("'token_ids' must be a non-empty list of integers")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise InvalidInputError(f"'token_ids' must be integers in [0, {vocab})")
        return list(token_ids)

    def encode_all(self, items: Sequence[Mapping[str, Any]]) -> list[EncodedItem]:
        """Encode every item, naming the index of the first bad one."""
        if isinstance(items, Mapping) or not isinstance(items, Sequence):
            raise InvalidInputError("score() takes a list of items")
        encoded = []
        for index, item in enumerate(items):
            try:
                encoded.append(self.encode(item))
            except (InvalidInputError, FormatError) as exc:
                raise type(exc)(f"item {index}: {exc}") from None
        return encoded

    def submit(self, encoded: EncodedItem, priority: int = 0) -> Future:
        """Queue one encoded item; the future resolves to the engine's finished `Request`."""
        return self.loop.submit(encoded.token_ids, encoded.read_positions, priority)

    def submit_many(self, encoded: Sequence[EncodedItem], priority: int = 0) -> list[Future]:
        """Queue encoded items together: admitted whole or refused whole (QueueFullError)."""
        return self.loop.submit_many([(e.token_ids, e.read_positions) for e in encoded], priority)

    def result(self, request: Request) -> ScoreResult:
        """Step rewards of a finished request, by the format's formula."""
        return ScoreResult(self.format.rewards(request.outputs), request.usage)

    def score(self, items: Sequence[Mapping[str, Any]], priority: int = 0, progress: bool = False) -> list[ScoreResult]:
        """Score items (results in item order); all are queued at once so shared prefixes are computed once."""
        futures = self.submit_many(self.encode_all(items), priority)
        if progress:
            from tqdm import tqdm

            for _ in tqdm(as_completed(futures), total=len(futures), desc="scoring", unit="item"):
                pass
        return [self.result(f.result()) for f in futures]

    async def score_async(self, items: Sequence[Mapping[str, Any]], priority: int = 0) -> list[ScoreResult]:
        """Like `score`, for asyncio callers; cancelling the awaiting task aborts the queued work."""
        futures = self.submit_many(self.encode_all(items), priority)
        try:
            requests = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return [self.result(r) for r in requests]

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes and their rewards: call after changing the model's weights."""
        if self._loop is not None:
            self._loop.reset_prefix_cache()
        else:
            self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Finish queued work and stop the engine thread."""
        if self._loop is not None:
            self._loop.shutdown()
            self._loop = None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: str | torch.dtype | None, config: BackboneConfig, device: torch.device) -> torch.dtype:
    """The asked dtype; else the checkpoint's on GPU and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def _tensor_names_if_needed(path: Path, config: BackboneConfig) -> set[str] | None:
    """Tensor names, read only when the architecture alone cannot name the format."""
    if any(a.endswith("ForCausalLM") for a in config.architectures):
        from contextlib import ExitStack

        with ExitStack() as stack:
            return CheckpointTensors(path, stack).names()
    return None
