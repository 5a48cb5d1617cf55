"""Hugging Face checkpoint -> Flax params: a name map with a shape check on every tensor.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`) and
`flax_model.msgpack`. Safetensors are streamed tensor by tensor with plain reads (no mmap, no
whole-file buffer), so peak host memory stays near the size of the params themselves. Pickled
`pytorch_model.bin` is never unpickled: unpickling runs code from the file.
"""

from __future__ import annotations

import gc
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gpt2model.config import GPT2Config
from gpt2model.errors import CheckpointError
from gpt2model.hub import resolve_file

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# Buffers some GPT-2 checkpoints carry (the causal mask); they are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_ALIGNMENT = 64  # bytes; what XLA's CPU client needs to adopt a host buffer without a copy

_LAYER_MAP = {
    "ln_1.weight": ("ln_1", "ln", "scale"), "ln_1.bias": ("ln_1", "ln", "bias"),
    "ln_2.weight": ("ln_2", "ln", "scale"), "ln_2.bias": ("ln_2", "ln", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}


def expected_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax param path -> shape, derived from the config (the contract the checkpoint must meet)."""
    e, inner, v = config.n_embd, config.inner_dim, config.vocab_size
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {
        ("transformer", "wte", "embedding"): (v, e),
        ("transformer", "wpe", "embedding"): (config.n_positions, e),
        ("transformer", "ln_f", "ln", "scale"): (e,),
        ("transformer", "ln_f", "ln", "bias"): (e,),
    }
    per_layer = {
        ("ln_1", "ln", "scale"): (e,), ("ln_1", "ln", "bias"): (e,),
        ("ln_2", "ln", "scale"): (e,), ("ln_2", "ln", "bias"): (e,),
        ("attn", "c_attn", "kernel"): (e, 3 * e), ("attn", "c_attn", "bias"): (3 * e,),
        ("attn", "c_proj", "kernel"): (e, e), ("attn", "c_proj", "bias"): (e,),
        ("mlp", "c_fc", "kernel"): (e, inner), ("mlp", "c_fc", "bias"): (inner,),
        ("mlp", "c_proj", "kernel"): (inner, e), ("mlp", "c_proj", "bias"): (e,),
    }
    for i in range(config.n_layer):
        for sub, shape in per_layer.items():
            shapes[("transformer", f"h_{i}", *sub)] = shape
    if not config.tie_word_embeddings:
        shapes[("lm_head",)] = (e, v)
    return shapes


def hf_name_to_path(name: str) -> tuple[str, ...] | None:
    """Map a PyTorch-style tensor name to our Flax param path; None for ignored buffers."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight":
        return ("lm_head",)
    name = name.removeprefix("transformer.")
    if name in ("wte.weight", "wpe.weight"):
        return ("transformer", name.split(".")[0], "embedding")
    if name in ("ln_f.weight", "ln_f.bias"):
        return ("transformer", "ln_f", "ln", "scale" if name.endswith("weight") else "bias")
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        return ("transformer", f"h_{parts[1]}", *_LAYER_MAP[parts[2]])
    return ("?", name)


def read_safetensors(path: Path, data: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, reading each with a plain file read.

    Our own reader of the (simple, documented) safetensors format rather than an mmap: mapped
    pages count towards resident memory, which would double the peak while params are built.
    With `data=False` only the header is read: every dtype, byte range and the file size are
    still checked, and each array is a zero-stride stand-in of the right shape and dtype.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors header") from None
            base = 8 + n
            for name, dtype, shape, begin, end in _header_entries(path, header):
                count = math.prod(shape)
                if end - begin != count * np.dtype(dtype).itemsize or base + end > size:
                    raise CheckpointError(
                        f"{path}: tensor {name} is truncated or its size does not match its "
                        f"shape {list(shape)} (file is {size} bytes, tensor ends at {base + end})"
                    )
                if not data:
                    yield name, np.broadcast_to(np.zeros((), dtype), shape)
                    continue
                arr = _aligned_empty(shape, dtype)
                f.seek(base + begin)
                if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != end - begin:
                    raise CheckpointError(f"{path}: truncated while reading tensor {name}")
                yield name, arr
                del arr  # the consumer may have freed its copy; do not hold one across reads
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None


def _header_entries(path: Path, header: Any) -> list[tuple[str, Any, tuple[int, ...], int, int]]:
    """(name, dtype, shape, begin, end) of every tensor in a safetensors header, by offset.

    The header is JSON from the file, so its structure is checked here: a corrupt one is a
    CheckpointError naming the file, never a KeyError or TypeError from deep in the loader.
    """
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"),
                                                                       str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype "
                                  f"{info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(d) is int and d >= 0 for d in shape + offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name} has a corrupt shape {shape!r} or "
                                  f"data_offsets {offsets!r}")
        entries.append((name, dtype, tuple(shape), offsets[0], offsets[1]))
    return sorted(entries, key=lambda e: e[3])


def _flax_msgpack_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Hugging Face Flax checkpoint, renamed to the PyTorch names we map from.

    HF's Flax GPT-2 stores Conv1D kernels as (out, in) and transposes at call time; we store
    (in, out) like PyTorch's Conv1D, so those kernels are transposed here. An untied head is a
    Flax Dense kernel (embd, vocab); transposed it is PyTorch's (vocab, embd) `lm_head.weight`.
    The whole tree is walked (not just `transformer`), so that head is not dropped.
    """
    from flax import serialization

    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # msgpack raises several unrelated types on corrupt input
        raise CheckpointError(f"{path}: not a readable Flax msgpack checkpoint ({err})") from None

    def walk(tree: dict, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        for key, val in tree.items():
            name = f"{prefix}{key}"
            if isinstance(val, dict):
                yield from walk(val, name + ".")
            else:
                leaf = key
                arr = np.asarray(val)
                if leaf == "kernel":
                    arr = arr.T
                    name = name[: -len("kernel")] + "weight"
                elif leaf in ("embedding", "scale"):
                    name = name[: -len(leaf)] + "weight"
                yield name, arr

    yield from walk(state, "")


def checkpoint_tensors(name_or_path: str | os.PathLike, data: bool = True
                       ) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (name, array) from whichever supported weights file the checkpoint has.

    `data=False`: safetensors headers only (see `read_safetensors`); msgpack is read whole.
    """
    index = resolve_file(name_or_path, "model.safetensors.index.json", required=False)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        for shard in sorted(set(weight_map.values())):
            yield from read_safetensors(resolve_file(name_or_path, shard), data)
        return
    single = resolve_file(name_or_path, "model.safetensors", required=False)
    if single is not None:
        yield from read_safetensors(single, data)
        return
    msgpack = resolve_file(name_or_path, "flax_model.msgpack", required=False)
    if msgpack is not None:
        yield from _flax_msgpack_tensors(msgpack)
        return
    pickled = resolve_file(name_or_path, "pytorch_model.bin", required=False)
    if pickled is not None:
        raise CheckpointError(
            f"{pickled}: only a pickled PyTorch checkpoint is available and pickles are never "
            "loaded (unpickling runs code from the file); convert it to model.safetensors, e.g. "
            "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
        )
    raise CheckpointError(
        f"no weights in {str(name_or_path)!r}: expected model.safetensors, "
        "model.safetensors.index.json or flax_model.msgpack"
    )


def load_params(name_or_path: str | os.PathLike, config: GPT2Config | None = None,
                param_dtype: Any = jnp.float32, *, check_only: bool = False) -> dict[str, Any]:
    """Load a checkpoint's weights as our Flax params tree (without running a forward pass).

    Every tensor is matched by name and its shape checked against the config; missing or
    unexpected tensors are errors that name them. `check_only`: run every check from the
    safetensors headers without reading tensor data, and return {} (see `check_checkpoint`).
    """
    config = config or GPT2Config.from_pretrained(name_or_path)
    shapes = expected_shapes(config)
    params: dict[str, Any] = {}
    seen: set[tuple[str, ...]] = set()
    for name, arr in checkpoint_tensors(name_or_path, data=not check_only):
        path = hf_name_to_path(name)
        if path is None or (path == ("lm_head",) and config.tie_word_embeddings):
            continue  # buffers, and the head a tied checkpoint duplicates from wte
        if path == ("lm_head",):
            arr = arr.T  # HF stores (vocab, embd); we keep (embd, vocab) like the other kernels
        if path not in shapes:
            raise CheckpointError(f"{name_or_path}: unexpected tensor {name!r} with shape "
                                  f"{list(arr.shape)} for a GPT-2 with {config.n_layer} layers")
        if tuple(arr.shape) != shapes[path]:
            raise CheckpointError(
                f"{name_or_path}: tensor {name!r} has shape {list(arr.shape)}, but config.json "
                f"implies {list(shapes[path])}"
            )
        if check_only:
            seen.add(path)
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _to_device(arr, param_dtype)
        del arr
        seen.add(path)
    missing = [".".join(p) for p in shapes if p not in seen]
    if missing:
        raise CheckpointError(
            f"{name_or_path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}"
        )
    return params


# Tensors from this size up get their own anonymous memory map instead of a NumPy buffer.
_MAPPED_BYTES = 1 << 20


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised host array whose data starts on a 64-byte boundary.

    JAX's CPU backend adopts such a buffer as a device array without copying it; an unaligned
    one is copied, so the largest tensor (wte) would briefly exist twice in host memory.
    A large tensor's buffer is an anonymous memory map (page-aligned): NumPy asks the kernel for
    transparent huge pages on large arrays, and under the common `madvise` defrag setting the
    first touch of those pages can stall on memory compaction; measured on gpt2 (500 MB) in
    fresh processes, reading the weights took 0.45-0.97 s with NumPy's buffers and 0.39-0.50 s
    with mapped ones.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes >= _MAPPED_BYTES:
        return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8, nbytes).view(dtype).reshape(shape)
    buf = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -buf.ctypes.data % _ALIGNMENT
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(arr: np.ndarray, dtype: Any) -> jax.Array:
    """Put one host tensor on the device (zero-copy on CPU) and release its host buffer now.

    jaxlib keeps the source NumPy array alive until an asynchronous copy is done and then defers
    dropping it to its garbage-collection hook; the block and the young-generation collection
    free each host buffer before the next tensor is read instead of at some later collection.
    """
    out = jax.device_put(arr)
    if out.dtype != np.dtype(dtype):
        out = out.astype(dtype)
    out.block_until_ready()
    del arr
    gc.collect(0)
    return out


def check_checkpoint(name_or_path: str | os.PathLike, config: GPT2Config | None = None
                     ) -> GPT2Config:
    """Check that a checkpoint's weights load, without loading them; return its config.

    The same name, shape, completeness and truncation checks as `load_params`, from the
    safetensors headers alone (a few KB read), so a launcher can refuse a broken checkpoint
    before any data is read. Raises CheckpointError (one line naming the file and the problem).
    """
    config = config or GPT2Config.from_pretrained(name_or_path)
    load_params(name_or_path, config, check_only=True)
    return config


def from_pretrained(name_or_path: str | os.PathLike, param_dtype: Any = jnp.float32
                    ) -> tuple[GPT2Config, dict[str, Any]]:
    """(config, params) of a Hub repo id or local Hugging Face directory."""
    config = GPT2Config.from_pretrained(name_or_path)
    return config, load_params(name_or_path, config, param_dtype)
