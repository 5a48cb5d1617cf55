"""Checkpoint loading: every supported format against transformers, and every error by its message.

Checkpoints are written by transformers (safetensors, sharded, bfloat16/float16, untied head) or,
for `flax_model.msgpack`, in Hugging Face's Flax GPT-2 layout built here from the PyTorch state
dict. Logits of the loaded model are compared with transformers' on the same weights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, write_hf_checkpoint
from flax import serialization

import gpt2model
from gpt2model import CheckpointError, GPT2Config, GPT2LMHeadModel, from_pretrained, load_params

LIVELY = dict(TINY, initializer_range=0.4)
IDS = np.array([[50256, 50256, 464, 13458, 7696, 318, 257, 1588],
                [11, 1110, 290, 22165, 5239, 373, 379, 13]], np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)


def our_logits(config: GPT2Config, params) -> np.ndarray:
    model = GPT2LMHeadModel(config)
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m))
    return np.asarray(fn(params, IDS, MASK)["logits"])


def hf_logits(ref: transformers.GPT2LMHeadModel) -> np.ndarray:
    positions = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(IDS, dtype=torch.long),
                  attention_mask=torch.tensor(MASK), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def assert_matches(config: GPT2Config, params, ref: transformers.GPT2LMHeadModel) -> None:
    real = MASK.astype(bool)
    diff = np.abs(our_logits(config, params) - hf_logits(ref))[real]
    assert diff.max() <= 1e-4, diff.max()


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def lively(tmp_path_factory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    path = write_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=3, **LIVELY)
    return path, transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def copy_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------- formats


def test_safetensors_loads_and_matches(lively):
    path, ref = lively
    config, params = from_pretrained(path)
    assert_matches(config, params, ref)


def test_params_map_names_and_layout_exactly(lively, monkeypatch):
    """Each tensor lands at its mirrored name, Conv1D kernels kept (in, out), no forward pass."""
    path, ref = lively

    def no_forward(*args, **kwargs):
        raise AssertionError("loading weights must not run the model")

    monkeypatch.setattr(nn.Module, "apply", no_forward)
    monkeypatch.setattr(nn.Module, "init", no_forward)
    config, params = from_pretrained(path)
    model_params = GPT2LMHeadModel(pretrained=str(path)).init(jax.random.key(0))["params"]
    monkeypatch.undo()

    assert isinstance(config, GPT2Config) and config.n_layer == TINY["n_layer"]
    expected = jax.eval_shape(GPT2LMHeadModel(config).init, jax.random.key(0),
                              jnp.zeros((1, 2), jnp.int32))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    t = params["transformer"]
    np.testing.assert_array_equal(t["wte"]["embedding"], state["transformer.wte.weight"])
    np.testing.assert_array_equal(t["wpe"]["embedding"], state["transformer.wpe.weight"])
    np.testing.assert_array_equal(t["ln_f"]["ln"]["scale"], state["transformer.ln_f.weight"])
    for i in range(config.n_layer):
        h, pre = t[f"h_{i}"], f"transformer.h.{i}."
        for ours, theirs in [(h["attn"]["c_attn"]["kernel"], "attn.c_attn.weight"),
                             (h["attn"]["c_proj"]["kernel"], "attn.c_proj.weight"),
                             (h["mlp"]["c_fc"]["kernel"], "mlp.c_fc.weight"),
                             (h["mlp"]["c_proj"]["bias"], "mlp.c_proj.bias"),
                             (h["ln_2"]["ln"]["bias"], "ln_2.bias")]:
            np.testing.assert_array_equal(ours, state[pre + theirs])
    for a, b in zip(jax.tree.leaves(model_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_params(path, config).keys() == params.keys()


def test_sharded_safetensors(lively, tmp_path):
    _, ref = lively
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_matches(*from_pretrained(tmp_path), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint(lively, tmp_path, dtype):
    path, _ = lively
    half = transformers.GPT2LMHeadModel.from_pretrained(path).to(dtype).eval()
    half.save_pretrained(tmp_path)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).float().eval()
    config, params = from_pretrained(tmp_path)
    assert params["transformer"]["wte"]["embedding"].dtype == jnp.float32
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"],
                                  ref.transformer.wte.weight.detach().numpy())
    assert_matches(config, params, ref)
    bf16 = load_params(tmp_path, config, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_untied_lm_head(tmp_path):
    path = write_hf_checkpoint(tmp_path, seed=4, tie_word_embeddings=False, **LIVELY)
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    config, params = from_pretrained(path)
    assert config.tie_word_embeddings is False
    head = ref.lm_head.weight.detach().numpy()
    assert not np.allclose(head, ref.transformer.wte.weight.detach().numpy())
    np.testing.assert_array_equal(params["lm_head"], head.T)
    assert_matches(config, params, ref)


def write_flax_msgpack(ref: transformers.GPT2LMHeadModel, directory: Path) -> Path:
    """A checkpoint in Hugging Face's Flax GPT-2 layout (transformers 4.x FlaxGPT2LMHeadModel).

    That layout: {'transformer': {'wte': {'embedding'}, 'wpe': {'embedding'}, 'h': {'0': {...}},
    'ln_f': {'scale', 'bias'}}}, with FlaxConv1D kernels stored (out, in), the transpose of
    PyTorch's Conv1D weight; an untied head is a Flax Dense kernel (in, out) under 'lm_head'.
    """
    sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}

    def ln(name):
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

    def conv(name):
        return {"kernel": np.ascontiguousarray(sd[f"{name}.weight"].T), "bias": sd[f"{name}.bias"]}

    blocks = {}
    for i in range(ref.config.n_layer):
        p = f"transformer.h.{i}"
        blocks[str(i)] = {
            "ln_1": ln(f"{p}.ln_1"), "ln_2": ln(f"{p}.ln_2"),
            "attn": {"c_attn": conv(f"{p}.attn.c_attn"), "c_proj": conv(f"{p}.attn.c_proj")},
            "mlp": {"c_fc": conv(f"{p}.mlp.c_fc"), "c_proj": conv(f"{p}.mlp.c_proj")},
        }
    tree = {"transformer": {"wte": {"embedding": sd["transformer.wte.weight"]},
                            "wpe": {"embedding": sd["transformer.wpe.weight"]},
                            "h": blocks, "ln_f": ln("transformer.ln_f")}}
    if not ref.config.tie_word_embeddings:
        tree["lm_head"] = {"kernel": np.ascontiguousarray(sd["lm_head.weight"].T)}
    directory.mkdir(parents=True, exist_ok=True)
    ref.config.save_pretrained(directory)
    (directory / "flax_model.msgpack").write_bytes(serialization.to_bytes(tree))
    return directory


@pytest.mark.parametrize("tied", [True, False])
def test_flax_msgpack(lively, tmp_path, tied):
    if tied:
        _, ref = lively
    else:
        ref = transformers.GPT2LMHeadModel.from_pretrained(
            write_hf_checkpoint(tmp_path / "untied", seed=5, tie_word_embeddings=False, **LIVELY)
        ).eval()
    path = write_flax_msgpack(ref, tmp_path / "flax")
    assert not list(path.glob("*.safetensors"))
    config, params = from_pretrained(path)
    assert ("lm_head" in params) is not tied
    assert_matches(config, params, ref)


# --------------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError) as e:
        GPT2LMHeadModel(pretrained=str(missing))
    assert "does not exist" in one_line_error(e) and str(missing) in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(missing, GPT2Config(**TINY))


def test_directory_without_weights(tiny_checkpoint, tmp_path):
    copy_config(tiny_checkpoint, tmp_path)
    model = GPT2LMHeadModel(pretrained=str(tmp_path))  # the config alone is fine
    with pytest.raises(CheckpointError) as e:
        model.init(jax.random.key(0))
    msg = one_line_error(e)
    assert str(tmp_path) in msg and "model.safetensors" in msg and "no weights" in msg


def test_pickled_checkpoint_is_refused_unopened(tiny_checkpoint, tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    copy_config(tiny_checkpoint, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = one_line_error(e)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "never" in msg
    assert not marker.exists()


def test_config_of_another_architecture(tiny_checkpoint, tmp_path):
    copy_config(tiny_checkpoint, tmp_path, model_type="llama")
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path)
    for load in (lambda: GPT2LMHeadModel(pretrained=str(tmp_path)),
                 lambda: from_pretrained(tmp_path)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = one_line_error(e)
        assert "config.json" in msg and "'llama'" in msg and "gpt2" in msg


def test_tensor_with_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    copy_config(tiny_checkpoint, tmp_path, n_positions=2 * TINY["n_positions"])
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path)
    model = GPT2LMHeadModel(pretrained=str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        model.init(jax.random.key(0))
    msg = one_line_error(e)
    assert "wpe" in msg and str([TINY["n_positions"], TINY["n_embd"]]) in msg
    assert str([2 * TINY["n_positions"], TINY["n_embd"]]) in msg


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tiny_checkpoint / "model.safetensors")
    del tensors["transformer.ln_f.bias"]
    copy_config(tiny_checkpoint, tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert "ln_f" in one_line_error(e)


@pytest.mark.parametrize("keep", [0, 5, 8 + 20, 0.5, -1])
def test_truncated_safetensors(tiny_checkpoint, tmp_path, keep):
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    copy_config(tiny_checkpoint, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert "model.safetensors" in one_line_error(e)


def test_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    for load in (lambda: GPT2LMHeadModel(pretrained="gpt2"),
                 lambda: from_pretrained("openai-community/gpt2"),
                 lambda: gpt2model.GPT2Config.from_pretrained("no-such-user/no-such-model")):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = one_line_error(e)
        assert "HF_HUB_OFFLINE" in msg and "local directory" in msg


# --------------------------------------------------------------------------- peak memory

# ru_maxrss is no use here: Linux carries the parent's peak (the whole pytest process) over
# fork and exec into the child. VmHWM in /proc/self/status belongs to the child's own address
# space, and writing 5 to clear_refs resets it to the current RSS after the imports.
MEASURE = r"""
import json, sys
import jax, jax.numpy as jnp
import gpt2model

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

jnp.zeros(8).block_until_ready()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass  # the peak then includes the imports: a stricter test
base = status("VmRSS")
config, params = gpt2model.from_pretrained(sys.argv[1])
jax.block_until_ready(params)
print(json.dumps({"base": base, "peak": status("VmHWM"),
                  "params": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_peak_memory_stays_under_one_and_a_half_checkpoints(tmp_path):
    """Peak RSS while loading, above the RSS after the imports, in a fresh process."""
    path = write_hf_checkpoint(tmp_path, seed=6, n_embd=512, n_layer=2, n_head=8,
                               n_positions=1024, vocab_size=50257)
    size = (path / "model.safetensors").stat().st_size
    assert size >= 100_000_000
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["params"] >= 0.99 * size  # all of it was loaded, in float32
    assert got["peak"] - got["base"] < 1.5 * size, (got, size)
