"""The models under test: one random-weight checkpoint per size, loaded by both implementations.

Both sides read the same `model.safetensors` (written by `gpt2model.export.random_checkpoint`
with GPT-2's initialization and the real 50257-token vocabulary), so their log-probs can be
compared before anything is timed: a broken model must not be able to look fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import jax_dtype, log, torch_dtype, torch_setup

# The smoke model of --quick is the `tiny` preset with a 256-token context: room for a
# 128-token prompt plus 64 new tokens, and long documents still need rolling windows.
TINY_OVERRIDES = dict(n_positions=256)


def model_config(size: str):
    """GPT2Config of a preset name (gpt2 ... gpt2-xl, or tiny with the short context above)."""
    from gpt2model import GPT2Config

    return GPT2Config.preset(size, **(TINY_OVERRIDES if size == "tiny" else {}))


def checkpoint(size: str, cache_dir: Path) -> Path:
    """Directory of the random checkpoint of `size`, written once and reused across runs."""
    from gpt2model.export import random_checkpoint

    path = Path(cache_dir) / f"random-{size}"
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        log(f"writing random {size} checkpoint to {path}")
        random_checkpoint(path, model_config(size), seed=0)
    return path


def load_ours(path: Path) -> tuple[Any, Any]:
    """(GPT2Config, params on jax's default device) through the project's own loader."""
    from gpt2model import from_pretrained

    return from_pretrained(path)


def load_peer(path: Path, dtype: str, device: str):
    """transformers' GPT2LMHeadModel with sdpa attention, cast with .to(dtype), in eval mode."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch_setup(device)
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="sdpa")
    return model.to(torch_dtype(dtype)).to(device).eval()


def word_ids(tokenizer) -> np.ndarray:
    """Ids of tokens that are a space plus a lowercase word: text made of them re-tokenizes to
    about one token per word, so a document's token length is what the generator asked for."""
    vocab = tokenizer.backend.get_vocab()
    ids = [i for tok, i in vocab.items()
           if tok.startswith("\u0120") and tok[1:].isascii() and tok[1:].isalpha()
           and tok[1:].islower() and len(tok) > 2]
    return np.array(sorted(ids), np.int32)


def scorer(config, params, dtype: str):
    from gpt2model import Scorer

    return Scorer(config, params, dtype=jax_dtype(dtype))


def free_torch(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
