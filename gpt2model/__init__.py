"""gpt2model: GPT-2 in Flax (JAX) that loads Hugging Face checkpoints, scores and generates.

Pure JAX + Flax; nothing here imports Beam or click. Names load on first use (PEP 562), so
`from gpt2model import GPT2Config, SamplingConfig` costs no JAX import: the CLI and the job
config read those before any model runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "gpt2model.errors",
    "GPT2Config": "gpt2model.config",
    "SamplingConfig": "gpt2model.config",
    "BeamSettings": "gpt2model.beam_search",
    "KVCache": "gpt2model.cache",
    "init_cache": "gpt2model.cache",
    "Generation": "gpt2model.generation",
    "Generator": "gpt2model.generation",
    "Sample": "gpt2model.generation",
    "GPT2LMHeadModel": "gpt2model.model",
    "GPT2Model": "gpt2model.model",
    "Scorer": "gpt2model.scoring",
    "TokenScores": "gpt2model.scoring",
    "TokenWindow": "gpt2model.scoring",
    "continuation_windows": "gpt2model.scoring",
    "text_windows": "gpt2model.scoring",
    "Tokenizer": "gpt2model.tokenizer",
    "get_tokenizer": "gpt2model.tokenizer",
    "from_pretrained": "gpt2model.weights",
    "load_params": "gpt2model.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
