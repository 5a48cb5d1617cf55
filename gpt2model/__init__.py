"""gpt2model: GPT-2 in Flax (JAX) that loads Hugging Face checkpoints, scores and generates.

Pure JAX + Flax; nothing here imports Beam or click.
"""

from gpt2model.cache import KVCache, init_cache
from gpt2model.config import GPT2Config
from gpt2model.errors import CheckpointError
from gpt2model.generation import Generation, Generator, SamplingConfig
from gpt2model.model import GPT2LMHeadModel, GPT2Model
from gpt2model.scoring import Scorer, TokenScores, continuation_windows, text_windows
from gpt2model.tokenizer import Tokenizer, get_tokenizer
from gpt2model.weights import from_pretrained, load_params

__all__ = [
    "CheckpointError",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "Generation",
    "Generator",
    "KVCache",
    "SamplingConfig",
    "Scorer",
    "TokenScores",
    "Tokenizer",
    "continuation_windows",
    "from_pretrained",
    "get_tokenizer",
    "init_cache",
    "load_params",
    "text_windows",
]
