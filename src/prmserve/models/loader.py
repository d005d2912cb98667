"""Find a checkpoint (local directory or hub ID) and load its tensors into a `RewardModel`.

Reads config.json, sharded or single safetensors, or a torch `pytorch_model.bin` through
`torch.load(weights_only=True)` (no pickled code ever runs). Checkpoint tensor names are mapped to
the fused layout of our layers (q/k/v into one projection, gate/up into one).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from prmserve.errors import CheckpointError
from prmserve.models.config import BackboneConfig
from prmserve.models.heads import HeadSpec, head_tensor_names, lm_head_weight
from prmserve.models.layers import rope_inverse_frequencies
from prmserve.models.transformer import RewardModel
from prmserve.parallel.group import TensorParallelGroup
from prmserve.parallel.sharding import Shard, shard_of

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
# Tensors some checkpoints carry that no head or backbone needs.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None, download_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory for a path, or for a hub ID after `snapshot_download` (at `revision`,
    into `download_dir` instead of the Hugging Face cache when given)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} applies to hub IDs; {str(name_or_path)!r} is a local directory")
        return path
    text = str(name_or_path)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"{text!r} is neither a local directory nor a Hugging Face model ID (org/name)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id=text, revision=revision, cache_dir=None if download_dir is None else str(download_dir), allow_patterns=_HUB_FILES,
        ))
    except Exception as exc:  # network, auth, missing repo: one clear message either way
        raise CheckpointError(f"could not fetch {text!r} from the Hugging Face hub: {exc}") from exc


class CheckpointTensors:
    """Read-only view of a checkpoint's tensors across its shards, loaded one at a time."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self._where: dict[str, object] = {}
        files = _weight_files(directory)
        for file in files:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                for name in handle.keys():
                    self._where[name] = handle
            else:
                for name, tensor in _torch_file_tensors(file).items():
                    self._where[name] = tensor

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk on demand."""
        source = self._where[name]
        return source if isinstance(source, torch.Tensor) else source.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        source = self._where[name]
        return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_slice(name).get_shape())

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of a tensor along dim 0 or 1 (a tensor-parallel rank's part): a safetensors file
        reads only those bytes, a torch file is memory-mapped (or was read whole, in the legacy format)."""
        source = self._where[name]
        if isinstance(source, torch.Tensor):
            return source.narrow(dim, start, stop - start)
        part = source.get_slice(name)
        return part[start:stop] if dim == 0 else part[:, start:stop]


def _torch_file_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` file, read with `weights_only=True`: memory-mapped when it is a zip
    archive (torch >= 1.6), read whole when it is the legacy format, which cannot be mapped."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError:  # the pickle holds objects besides tensors: running it could run any code
        raise CheckpointError(
            f"{file} holds pickled objects besides tensors, and prmserve never unpickles code. Convert it to "
            "safetensors once, where you trust the file: torch.load it with weights_only=False, keep its tensors, and "
            "save them with safetensors.torch.save_file as model.safetensors (a sharded checkpoint: every shard, and "
            "model.safetensors.index.json naming them)"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{file} could not be read as a tensor-only torch file: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file} is not a state dict (a mapping of tensor names to tensors)")
    return state


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, preferring safetensors, following an index if there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {missing}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, a sharded safetensors index, or pytorch_model.bin"
    )


def _backbone_prefix(names: set[str]) -> str:
    """Backbone tensors sit under `model.` in *ForCausalLM and reward checkpoints, at the root in bare ones."""
    return "model." if any(n.startswith("model.") for n in names) else ""


def _backbone_sources(cfg: BackboneConfig, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """(our parameter, checkpoint tensors concatenated into it) for every backbone parameter."""
    if cfg.model_type == "internlm2":
        yield from _internlm2_sources(cfg, prefix)
        return
    yield "embed_tokens.weight", [f"{prefix}embed_tokens.weight"]
    yield "norm.weight", [f"{prefix}norm.weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        yield ours + "self_attn.qkv_proj.weight", [theirs + f"self_attn.{p}_proj.weight" for p in "qkv"]
        if cfg.attention_bias:
            yield ours + "self_attn.qkv_proj.bias", [theirs + f"self_attn.{p}_proj.bias" for p in "qkv"]
        yield ours + "self_attn.o_proj.weight", [theirs + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            yield ours + "self_attn.q_norm.weight", [theirs + "self_attn.q_norm.weight"]
            yield ours + "self_attn.k_norm.weight", [theirs + "self_attn.k_norm.weight"]
        yield ours + "mlp.gate_up_proj.weight", [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"]
        yield ours + "mlp.down_proj.weight", [theirs + "mlp.down_proj.weight"]
        yield ours + "input_layernorm.weight", [theirs + "input_layernorm.weight"]
        yield ours + "post_attention_layernorm.weight", [theirs + "post_attention_layernorm.weight"]


def _internlm2_sources(cfg: BackboneConfig, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """InternLM2's names for the same Llama-style decoder; its packed `wqkv` is unpacked by `_read`."""
    yield "embed_tokens.weight", [f"{prefix}tok_embeddings.weight"]
    yield "norm.weight", [f"{prefix}norm.weight"]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        yield ours + "self_attn.qkv_proj.weight", [theirs + "attention.wqkv.weight"]
        yield ours + "self_attn.o_proj.weight", [theirs + "attention.wo.weight"]
        yield ours + "mlp.gate_up_proj.weight", [theirs + "feed_forward.w1.weight", theirs + "feed_forward.w3.weight"]
        yield ours + "mlp.down_proj.weight", [theirs + "feed_forward.w2.weight"]
        yield ours + "input_layernorm.weight", [theirs + "attention_norm.weight"]
        yield ours + "post_attention_layernorm.weight", [theirs + "ffn_norm.weight"]


def unpack_internlm2_wqkv(wqkv: torch.Tensor, cfg: BackboneConfig) -> torch.Tensor:
    """InternLM2's `wqkv` rows, grouped per KV head as [the group's q heads..., k, v], reordered to our
    [all q heads, all k heads, all v heads] (query head h*groups + j is the j-th q of KV group h)."""
    groups = cfg.num_heads // cfg.num_kv_heads
    per_group = wqkv.view(-1, groups + 2, cfg.head_dim, wqkv.shape[-1])  # -1: all KV heads, or a rank's
    q = per_group[:, :groups].reshape(-1, wqkv.shape[-1])
    k = per_group[:, groups].reshape(-1, wqkv.shape[-1])
    v = per_group[:, groups + 1].reshape(-1, wqkv.shape[-1])
    return torch.cat([q, k, v], dim=0)


def _read(tensors: "CheckpointTensors | StateDictTensors", name: str, cfg: BackboneConfig, shard: Shard | None = None) -> torch.Tensor:
    """One checkpoint tensor in our layout (InternLM2's packed wqkv unpacked, its shape checked first); with `shard`,
    only a tensor-parallel rank's part of it (of a packed wqkv: its KV heads' groups, contiguous rows)."""
    packed = cfg.model_type == "internlm2" and name.endswith("attention.wqkv.weight")
    if packed:
        rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        if tensors.shape(name) != (rows, cfg.hidden_size):
            raise CheckpointError(f"tensor {name} has shape {tensors.shape(name)}, but the config implies {(rows, cfg.hidden_size)}")
    value = tensors.get(name) if shard is None else shard.read(tensors, name)
    return unpack_internlm2_wqkv(value, cfg) if packed else value


def _lm_head_source(cfg: BackboneConfig, names: set[str], prefix: str) -> str:
    """The LM head tensor, or the embedding when the checkpoint ties them."""
    if "lm_head.weight" in names:
        return "lm_head.weight"
    if cfg.raw.get("tie_word_embeddings", False):
        return f"{prefix}embed_tokens.weight"
    return "lm_head.weight"  # reported as missing


def _format_names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class StateDictTensors:
    """A state dict in memory seen through the `CheckpointTensors` interface (benchmarks, conversions)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._state = state_dict

    def names(self) -> set[str]:
        return set(self._state)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._state[name].narrow(dim, start, stop - start)


def load_reward_model(
    directory: Path, cfg: BackboneConfig, head: HeadSpec, device: torch.device, dtype: torch.dtype,
    tp: TensorParallelGroup | None = None,
) -> RewardModel:
    """Build the model for `head` and fill it from the checkpoint directory (with `tp`, this rank's part of it)."""
    if head.reference_model is not None:  # an implicit PRM: this checkpoint and its reference, one model to the engine
        from prmserve.models.log_ratio import load_log_ratio_model

        return load_log_ratio_model(directory, cfg, head, device, dtype)
    with ExitStack() as stack:
        return build_reward_model(cfg, head, CheckpointTensors(directory, stack), device, dtype, str(directory), tp)


def build_reward_model(
    cfg: BackboneConfig,
    head: HeadSpec,
    tensors: CheckpointTensors | StateDictTensors,
    device: torch.device,
    dtype: torch.dtype,
    where: str = "checkpoint",
    tp: TensorParallelGroup | None = None,
) -> RewardModel:
    """Build the model for `head` from named tensors, refusing missing or unexpected ones. With `tp`, each split
    parameter gets only this rank's part of its tensors, and ranks other than 0 read no head."""
    with torch.device("meta"):
        model = RewardModel(cfg, head, tp)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    params = dict(model.named_parameters())

    names = tensors.names()
    prefix = _backbone_prefix(names)
    plan = list(_backbone_sources(cfg, prefix))
    head_plan = [(f"head.{ours}", [theirs]) for ours, theirs in head_tensor_names(head).items()]
    lm_source = _lm_head_source(cfg, names, prefix) if head.reads_lm_head else None
    needed = {t for _, sources in plan + head_plan for t in sources} | ({lm_source} if lm_source else set())
    if model.head is not None:
        plan += head_plan
    else:  # a tensor-parallel worker: the head is rank 0's
        lm_source = None

    missing = sorted(needed - names)
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {_format_names(missing)}")
    unexpected = [n for n in names - needed if not _IGNORED.search(n) and not n.startswith("lm_head.")]
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors for a {head.kind} head on a {cfg.model_type} backbone: "
            f"{_format_names(unexpected)} (is the format right?)"
        )

    with torch.no_grad():
        for ours, sources in plan:
            shard = None if tp is None else shard_of(model, ours, tp.rank, tp.world_size)
            parts = [_read(tensors, s, cfg, shard) for s in sources]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            _copy_checked(params[ours], value, ours, sources)
        if lm_source:
            _copy_checked(params["head.weight"], lm_head_weight(head, tensors.get(lm_source)), "head.weight", [lm_source])
    model.eval()
    model.requires_grad_(False)
    return model


def _copy_checked(param: torch.Tensor, value: torch.Tensor, ours: str, sources: list[str]) -> None:
    if param.shape != value.shape:
        raise CheckpointError(
            f"tensor {' + '.join(sources)} has shape {tuple(value.shape)}, but the config implies {tuple(param.shape)}"
        )
    param.copy_(value.to(param.dtype))
