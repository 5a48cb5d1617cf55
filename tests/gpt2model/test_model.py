"""The Flax GPT-2 against transformers' PyTorch GPT2LMHeadModel, and its fixed-size KV cache.

Every expected number comes from transformers running the same checkpoint: the checkpoints are
written by transformers (`save_pretrained`, safetensors) and loaded back through
`GPT2LMHeadModel(pretrained=dir)`, as a user would load one from the Hub.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, write_hf_checkpoint

import gpt2model
from gpt2model import GPT2LMHeadModel, init_cache

EOS = 50256
# Larger random weights than transformers' default (std 0.02): logits of a few units that change
# with the context, so a comparison says something beyond "both are near uniform".
LIVELY = dict(TINY, initializer_range=0.4)


def left_padded(rows: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] ids (pads = eos) and mask of left-padded rows."""
    length = length or max(map(len, rows))
    ids = np.full((len(rows), length), EOS, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    return ids, mask


def hf_logits(ref: transformers.GPT2LMHeadModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' logits, with the position ids left padding needs (cumsum(mask) - 1)."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long),
                  position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def random_rows(rng: np.random.Generator, lengths: list[int]) -> list[list[int]]:
    return [rng.integers(0, EOS, n).tolist() for n in lengths]


class Loaded:
    """A checkpoint loaded both ways: ours (flaxmodels-style init) and transformers'."""

    def __init__(self, path):
        self.path = path
        self.model = GPT2LMHeadModel(pretrained=str(path))
        self.params = self.model.init(jax.random.key(0), input_ids=jnp.zeros((1, 4), jnp.int32))
        self.config = self.model.config
        self.ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        self._logits = jax.jit(lambda params, ids, mask: self.model.apply(
            params, input_ids=ids, attention_mask=mask)["logits"])

    def logits(self, ids, mask=None) -> np.ndarray:
        mask = np.ones(np.shape(ids), np.int32) if mask is None else mask
        return np.asarray(self._logits(self.params, ids, mask))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Loaded:
    return Loaded(tiny_checkpoint)


@pytest.fixture(scope="module")
def lively(tmp_path_factory) -> Loaded:
    return Loaded(write_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=1, **LIVELY))


@pytest.fixture(params=["tiny", "lively"])
def loaded(request) -> Loaded:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------- parity


def test_init_with_pretrained_returns_the_checkpoint(tiny):
    wte = tiny.ref.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(tiny.params["params"]["transformer"]["wte"]
                                             ["embedding"]), wte)
    assert tiny.config == gpt2model.GPT2Config.from_pretrained(tiny.path)


# One left-padded batch for most tests: a full-length row (no padding) and padded ones. Shared
# shapes keep the number of compiles, most of this file's run time, small.
BATCH = left_padded(random_rows(np.random.default_rng(0), [20, 7, 13, 1]))


def test_logits_match_transformers_with_left_padding(loaded):
    ids, mask = BATCH
    ours = loaded.logits(ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (4, 20, 50257)
    ref = hf_logits(loaded.ref, ids, mask)
    assert np.max(np.abs(ours[0] - ref[0])) <= 1e-4  # the unpadded row, every position
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4
    assert np.all(np.isfinite(ours))  # pad positions attend to nothing yet stay finite


def test_padded_row_equals_the_row_unpadded(lively):
    ids, mask = BATCH
    padded = lively.logits(ids, mask)
    for r in (1, 2, 3):
        n = int(mask[r].sum())
        alone = lively.logits(ids[r:r + 1, -n:])[0]
        # Logits here reach ~12: float32 rounding of a different key count (the masked pads
        # still take part in the matmuls) moves them by ~1e-6 relative.
        np.testing.assert_allclose(padded[r, -n:], alone, rtol=0, atol=2e-5)


def test_blocked_causal_attention_equals_one_full_softmax():
    """Query blocks that skip the keys above the diagonal compute what one masked softmax over
    all keys computes, for a length that is not a multiple of the block, with left padding and
    packed segments in the mask."""
    from gpt2model.model import QUERY_BLOCK, attend, causal_attend

    rng = np.random.default_rng(7)
    b, h, t, d = 2, 3, 2 * QUERY_BLOCK + 37, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.float32) for _ in range(3))
    segments = np.zeros((b, t), np.int32)
    segments[0, 40:] = 1  # left padding
    segments[1, :150], segments[1, 150:290] = 1, 2  # two packed texts, padded tail
    causal = np.tril(np.ones((t, t), bool))
    mask = jnp.asarray(causal & (segments[:, :, None] == segments[:, None, :])
                       & (segments[:, None, :] > 0))
    got = np.asarray(causal_attend(q, k, v, mask, 0.3, jnp.float32))
    full = np.asarray(attend(q, k, v, mask, 0.3, jnp.float32))
    assert np.all(np.isfinite(got))
    # Fully masked rows (pads) may hold any finite value; every other row is compared.
    sel = np.broadcast_to(np.asarray(mask).any(-1)[:, None], got.shape[:3])
    np.testing.assert_allclose(got[sel], full[sel], rtol=0, atol=1e-6)
    # And the reference: a float64 softmax over the scores with masked entries removed.
    scores = np.einsum("bhtd,bhsd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64))
    scores = np.where(np.asarray(mask)[:, None], scores * 0.3, -np.inf)
    with np.errstate(invalid="ignore"):  # the fully masked rows: -inf - -inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhts,bhsd->bhtd", np.nan_to_num(probs), np.asarray(v, np.float64))
    np.testing.assert_allclose(got[sel], want[sel], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_query_row_attention_equals_the_float64_softmax(dtype):
    """A decode step's single query row (its own weighted-sum path) against a float64 softmax
    over the visible slots, with masked slots (left padding, unwritten cache slots)."""
    from gpt2model.model import attend

    rng = np.random.default_rng(11)
    b, h, s, d = 3, 2, 37, 8
    q = jnp.asarray(rng.normal(size=(b, h, 1, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, h, s, d)), dtype) for _ in range(2))
    mask = np.ones((b, 1, s), bool)
    mask[0, 0, :5] = False  # left padding
    mask[1, 0, 30:] = False  # slots not written yet
    got = np.asarray(attend(q, k, v, jnp.asarray(mask), 0.3, dtype))
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.where(mask[:, None], np.einsum("bhtd,bhsd->bhts", q64, k64) * 0.3, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhts,bhsd->bhtd", probs / probs.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_rows_longer_than_an_attention_block_match_transformers(tmp_path):
    """The blocked attention path (rows over QUERY_BLOCK tokens) against transformers."""
    path = write_hf_checkpoint(tmp_path, seed=2, **dict(LIVELY, n_positions=320))
    long = Loaded(path)
    ids, mask = left_padded(random_rows(np.random.default_rng(3), [300, 141]))
    ours = long.logits(ids, mask)
    ref = hf_logits(long.ref, ids, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4


def test_one_dimensional_input_is_one_sequence(lively):
    row = BATCH[0][0]
    out = jax.jit(lively.model.apply)(lively.params, input_ids=row)
    assert set(out) >= {"logits", "past_key_values", "last_hidden_state"}
    assert out["logits"].shape == (1, 20, 50257)
    assert out["last_hidden_state"].shape == (1, 20, lively.config.n_embd)
    np.testing.assert_allclose(np.asarray(out["logits"]), lively.logits(row[None]), rtol=0,
                               atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(lively):
    ids, mask = BATCH
    f32 = lively.logits(ids, mask)
    bf16_model = GPT2LMHeadModel(lively.config, dtype=jnp.bfloat16)
    out = jax.jit(bf16_model.apply)(lively.params, input_ids=ids, attention_mask=mask)["logits"]
    assert out.dtype == jnp.float32
    real = mask.astype(bool)
    err = np.max(np.abs(np.asarray(out)[real] - f32[real]))
    scale = np.max(np.abs(f32[real]))
    assert scale > 1.0  # the comparison is about logits of a few units, not ~0
    assert err <= 0.05 * scale, (err, scale)
    # Same argmax almost everywhere: bf16 only perturbs the ranking of near ties.
    agree = np.mean(np.argmax(np.asarray(out), -1)[real] == np.argmax(f32, -1)[real])
    assert agree >= 0.9


def test_bfloat16_params_load_and_run(tiny_checkpoint):
    model = GPT2LMHeadModel(pretrained=str(tiny_checkpoint), dtype=jnp.bfloat16,
                            param_dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), input_ids=jnp.zeros((1, 2), jnp.int32))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.jit(model.apply)(params, input_ids=jnp.arange(5))["logits"].dtype == jnp.float32


# ------------------------------------------------------------------------------- KV cache


def test_cache_is_allocated_when_none_is_passed(tiny):
    apply = jax.jit(tiny.model.apply, static_argnames="use_cache")
    cache = apply(tiny.params, input_ids=jnp.arange(5), use_cache=True)["past_key_values"]
    assert isinstance(cache, gpt2model.KVCache)
    assert cache.max_length == tiny.config.n_positions
    assert int(cache.index) == 5 and len(cache.keys) == tiny.config.n_layer
    assert apply(tiny.params, input_ids=jnp.arange(5), use_cache=False)["past_key_values"] is None


def test_cached_decoding_equals_full_forward_and_compiles_once(lively):
    """Prefill a left-padded batch, then 20 one-token steps, against one full forward pass."""
    cfg, model, params = lively.config, lively.model, lively.params
    rng = np.random.default_rng(4)
    prompts = random_rows(rng, [6, 3, 1])
    steps = 20
    prompt_ids, prompt_mask = left_padded(prompts)
    p = prompt_ids.shape[1]
    new = rng.integers(0, cfg.vocab_size, (3, steps)).astype(np.int32)
    ids = np.concatenate([prompt_ids, new], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    full = hf_logits(lively.ref, ids, mask)  # the reference for every position
    real = mask.astype(bool)

    cache = init_cache(cfg, 3, p + steps)
    out = jax.jit(lambda params, ids, mask, cache: model.apply(
        params, input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True))(
        params, prompt_ids, prompt_mask, cache)
    pre = np.asarray(out["logits"])
    assert np.max(np.abs(pre[real[:, :p]] - full[:, :p][real[:, :p]])) <= 1e-4

    @jax.jit
    def step(params, token, cache):
        out = model.apply(params, input_ids=token, past_key_values=cache, use_cache=True)
        return out["logits"][:, -1], out["past_key_values"]

    cache = out["past_key_values"]
    before = jax.tree.structure(cache), [(x.shape, x.dtype) for x in jax.tree.leaves(cache)]
    worst = 0.0
    for i in range(steps):
        logits, cache = step(params, jnp.asarray(new[:, i:i + 1]), cache)
        worst = max(worst, float(np.max(np.abs(np.asarray(logits) - full[:, p + i]))))
        after = jax.tree.structure(cache), [(x.shape, x.dtype) for x in jax.tree.leaves(cache)]
        assert after == before and type(cache) is gpt2model.KVCache
    assert worst <= 1e-4
    assert step._cache_size() == 1  # one compile for all 20 steps
    assert int(cache.index) == p + steps
    np.testing.assert_array_equal(np.asarray(cache.position), [len(x) + steps for x in prompts])


def test_cache_overflow_raises(tiny):
    """Checked eagerly, before any compute (inside jit the index is not known)."""
    cache = init_cache(tiny.config, 1, 8).replace(index=jnp.asarray(6, jnp.int32))  # 6 used
    with pytest.raises(ValueError, match=r"KV cache is full: 6 \+ 3 tokens exceed its length 8"):
        tiny.model.apply(tiny.params, input_ids=jnp.arange(3), past_key_values=cache,
                         use_cache=True)
    with pytest.raises(ValueError, match="n_positions"):
        init_cache(tiny.config, 1, tiny.config.n_positions + 1)


def test_inputs_longer_than_the_context_raise(tiny):
    """Past n_positions there is no position embedding: refuse, do not clamp silently."""
    n = tiny.config.n_positions
    with pytest.raises(ValueError, match=f"{n + 1} tokens exceed the model's context"):
        tiny.logits(np.zeros((1, n + 1), np.int32))  # under jit: the length is static
    with pytest.raises(ValueError, match="do not fit a KV cache of length 4"):
        jax.jit(lambda p, c: tiny.model.apply(p, input_ids=jnp.arange(5), past_key_values=c,
                                              use_cache=True))(tiny.params,
                                                               init_cache(tiny.config, 1, 4))


# ------------------------------------------------------------------ full size (gpt2 shape)


@pytest.fixture(scope="module")
def gpt2_shape(tmp_path_factory) -> Loaded:
    """Random weights in the full gpt2 shape: 12 layers, 768 wide, 50257 vocab, 1024 positions."""
    path = write_hf_checkpoint(tmp_path_factory.mktemp("gpt2-shape"), seed=0)
    loaded = Loaded(path)
    assert (loaded.config.n_layer, loaded.config.n_embd, loaded.config.vocab_size,
            loaded.config.n_positions) == (12, 768, 50257, 1024)
    return loaded


@pytest.mark.slow
def test_full_size_logits_and_logprobs_match_transformers(gpt2_shape):
    rng = np.random.default_rng(5)
    rows = random_rows(rng, [32, 19])
    ids, mask = left_padded(rows)
    ours = gpt2_shape.logits(ids, mask)
    ref = hf_logits(gpt2_shape.ref, ids, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4

    scorer = gpt2model.Scorer(gpt2_shape.config, gpt2_shape.params["params"])
    scores = scorer.score_texts(rows)
    for row, got in zip(rows, scores, strict=True):
        seq = np.array([[EOS, *row]])
        logp = torch.log_softmax(torch.tensor(hf_logits(gpt2_shape.ref, seq,
                                                        np.ones_like(seq))[0]), -1).numpy()
        want = logp[np.arange(len(row)), row]
        assert np.max(np.abs(got.logprobs - want)) <= 1e-4


def test_compute_params_casts_matmul_weights_only(tiny):
    from gpt2model.model import HEAD, compute_params

    params = tiny.params["params"]
    same = compute_params(params, jnp.float32)
    wte = params["transformer"]["wte"]["embedding"]
    assert same[HEAD] is wte  # a tied float32 head is wte itself, no copy
    assert same["transformer"] is params["transformer"]
    cast = compute_params(params, jnp.bfloat16)
    flat = jax.tree_util.tree_flatten_with_path(cast)[0]
    kinds = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in flat}
    assert kinds and all((dt == jnp.bfloat16) == (path.endswith("['kernel']")
                                                  or path == f"['{HEAD}']")
                         for path, dt in kinds.items()), kinds
    np.testing.assert_array_equal(np.asarray(cast[HEAD], np.float32),
                                  np.asarray(wte.astype(jnp.bfloat16), np.float32))
    # Cast once: casting an already cast tree returns the same arrays.
    again = compute_params(cast, jnp.bfloat16)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(cast), strict=True))


def test_compute_params_keeps_an_untied_head_vocab_major():
    """An untied lm_head [E, V] (the checkpoint's Flax Dense kernel) is transposed once to the
    [V, E] head every compute path contracts, and the logits equal the module's own."""
    from gpt2model.model import HEAD, compute_params, head_logits, lm_head_weights

    cfg = gpt2model.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                     tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg)
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    computed = compute_params(params, jnp.float32)
    assert "lm_head" not in computed and computed[HEAD].shape == (64, 32)
    np.testing.assert_array_equal(computed[HEAD], np.asarray(params["lm_head"]).T)
    np.testing.assert_array_equal(lm_head_weights(computed, cfg),
                                  lm_head_weights(params, cfg))
    out = model.apply({"params": params}, ids)
    got = head_logits(out["last_hidden_state"], computed[HEAD], jnp.float32)
    np.testing.assert_allclose(got, out["logits"], rtol=0, atol=1e-6)
