"""GPT-2 as Flax linen modules, parameter names mirroring the Hugging Face checkpoint.

Module names are `wte`, `wpe`, `h_0..h_N` (`ln_1`, `attn/c_attn`, `attn/c_proj`, `ln_2`,
`mlp/c_fc`, `mlp/c_proj`), `ln_f`, so weight conversion is a name map with shape checks.
Matmuls run in `dtype` (bfloat16 on accelerators) with float32 accumulation; the residual
stream, layer norms, softmax and logits stay float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2model import cache as kv
from gpt2model.config import GPT2Config

Dtype = Any

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}

_init = nn.initializers.normal(stddev=0.02)


def matmul(x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
    """x @ w with operands in `dtype` and a float32 result.

    Asking XLA for float32 output from bfloat16 operands is what makes the bf16 path fast on
    CPU (oneDNN/AVX-512 bf16 kernels) and is free on GPU/TPU matrix units.
    """
    return jax.lax.dot_general(
        x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def head_logits(h: jax.Array, head: jax.Array, dtype: Dtype) -> jax.Array:
    """LM-head logits [..., V] in float32 from hidden states [..., E] and the head [V, E]
    (`lm_head_weights`), contracted on E with no transpose materialized."""
    return jax.lax.dot_general(
        h.astype(dtype), head.astype(dtype), (((h.ndim - 1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def head_logits_by_vocab(h: jax.Array, head: jax.Array, dtype: Dtype) -> jax.Array:
    """`head_logits` of h [C, E] laid out vocab-major, [V, C]: head @ h.T.

    The same products, but XLA's CPU backend runs [V, E] @ [E, C] about 15% faster than
    [C, E] @ [E, V] for the scorer's 128-row chunks, in float32 and in bfloat16
    (BENCHMARKS.md, "Design measurements"); the log-softmax then reduces over axis 0.
    """
    return jax.lax.dot_general(
        head.astype(dtype), h.astype(dtype), (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


# compute_params' entry for the LM head, vocab-major [V, E] in the compute dtype.
HEAD = "head"


def lm_head_weights(params: Any, config: GPT2Config) -> jax.Array:
    """The LM head [V, E] of a GPT2LMHeadModel params tree: compute_params' cast copy when
    there is one, else wte itself (tied) or the untied lm_head [E, V] transposed."""
    if HEAD in params:
        return params[HEAD]
    if config.tie_word_embeddings:
        return params["transformer"]["wte"]["embedding"]
    return params["lm_head"].T


def compute_params(params: Any, dtype: Dtype) -> Any:
    """The params with every matmul weight (Conv1D kernels, the LM head) stored in `dtype`.

    `matmul` casts its weight on every call; casting once up front saves that pass over the
    weights per batch (for a tied head in bfloat16, 30 ms of a 2,048-token scoring step:
    BENCHMARKS.md, "Design measurements") and halves the weights' memory, which is the point
    for gpt2-xl on an accelerator. The head is kept vocab-major under `HEAD` (an untied
    lm_head is transposed once here and dropped; a tied float32 head is wte itself, no copy).
    Embeddings, biases and layer norms stay as they are (float32): the residual stream starts
    from unrounded embeddings. Applying it twice changes nothing.
    """
    dtype = jnp.dtype(dtype)
    if HEAD in params:
        head = params[HEAD]
    elif "lm_head" in params:
        head = jnp.asarray(params["lm_head"]).T
    else:
        head = params["transformer"]["wte"]["embedding"]
    if head.dtype != dtype:
        head = jnp.asarray(head).astype(dtype)

    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "kernel" and leaf.dtype != dtype:
            return leaf.astype(dtype)
        return leaf

    rest = {k: v for k, v in params.items() if k not in (HEAD, "lm_head")}
    if dtype != jnp.float32:
        rest = jax.tree_util.tree_map_with_path(cast, rest)
    return {**rest, HEAD: head}


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: a dense layer whose kernel is stored (in, out)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return matmul(x, kernel, self.dtype) + bias.astype(jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype."""

    epsilon: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=self.param_dtype,
                            name="ln")(x.astype(jnp.float32))


# Query rows per attention block when there is no cache (scoring, packed rows). Each block
# attends to the keys up to its last row only, so the causal upper triangle is never computed
# and the score tile stays cache-sized, which beat one [B, H, T, T] score tensor and the other
# block sizes tried (BENCHMARKS.md, "Design measurements").
QUERY_BLOCK = 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
           dtype: Dtype) -> jax.Array:
    """Softmax attention of q [B, H, t, D] over k, v [B, H, s, D] with mask [B, t, s] (bool).

    Scores and softmax run in float32; the normalization is applied to the [t, D] output rather
    than the [t, s] probabilities (one pass less over the scores). A row with no visible key
    (a left pad) gets a uniform average, finite like the rest.
    """
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if q.shape[2] == 1:
        # A decode step's one query row: the weighted sum of the cached values as a multiply and
        # a reduction over the slots, which XLA's CPU backend fuses into one pass over v: about
        # 20% less time than [B*H] tiny [1, S] @ [S, D] dots (BENCHMARKS.md, "Design
        # measurements"). Float32 throughout, like the dots' accumulation.
        out = jnp.sum(weights[:, :, 0, :, None] * v.astype(jnp.float32), axis=2)[:, :, None]
    else:
        out = jnp.einsum("bhts,bhsd->bhtd", weights.astype(dtype), v,
                         preferred_element_type=jnp.float32)
    return out / total


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                  dtype: Dtype, block: int = QUERY_BLOCK) -> jax.Array:
    """`attend` for q, k, v of the same length T whose mask is causal (within it any padding or
    segment mask): query block i only sees keys [0, end of block i), the rest being masked."""
    t = q.shape[2]
    if t <= block:
        return attend(q, k, v, mask, scale, dtype)
    outs = [attend(q[:, :, i:i + block], k[:, :, :i + block], v[:, :, :i + block],
                   mask[:, i:i + block, :i + block], scale, dtype)
            for i in range(0, t, block)]
    return jnp.concatenate(outs, axis=2)


class Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_mask, layer_cache, collect_kv: bool = False):
        """x: [B, T, E]; kv_mask: [B, T, S] bool; layer_cache: (k, v, index) or None.

        Returns (output, (k, v)): the updated cache layer, or with no cache and collect_kv this
        call's own keys and values [B, H, T, D] (else None)."""
        cfg = self.config
        b, t, _ = x.shape
        qkv = Conv1D(3 * cfg.n_embd, self.dtype, self.param_dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv.astype(self.dtype), 3, axis=-1)
        # [B, H, T, D]: heads lead, the layout the cache keeps (see cache.KVCache).
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim).transpose(0, 2, 1, 3)
                   for a in (q, k, v))
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        if layer_cache is not None:
            cache_k, cache_v, index = layer_cache
            k = kv.write(cache_k, k, index)  # [B, H, S, D]
            v = kv.write(cache_v, v, index)
            new_cache = (k, v)
            out = attend(q, k.astype(self.dtype), v.astype(self.dtype), kv_mask, scale,
                         self.dtype)
        else:
            out = causal_attend(q, k, v, kv_mask, scale, self.dtype)
            new_cache = (k, v) if collect_kv else None
        out = out.transpose(0, 2, 1, 3).reshape(b, t, cfg.n_embd)
        return Conv1D(cfg.n_embd, self.dtype, self.param_dtype, name="c_proj")(out), new_cache


class MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = Conv1D(cfg.inner_dim, self.dtype, self.param_dtype, name="c_fc")(x)
        h = ACTIVATIONS[cfg.activation_function](h)
        return Conv1D(cfg.n_embd, self.dtype, self.param_dtype, name="c_proj")(h)


class Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_mask, layer_cache, collect_kv: bool = False):
        eps = self.config.layer_norm_epsilon
        h = LayerNorm(eps, self.param_dtype, name="ln_1")(x)
        a, new_cache = Attention(self.config, self.layer_idx, self.dtype, self.param_dtype,
                                 name="attn")(h, kv_mask, layer_cache, collect_kv)
        x = x + a
        h = LayerNorm(eps, self.param_dtype, name="ln_2")(x)
        x = x + MLP(self.config, self.dtype, self.param_dtype, name="mlp")(h)
        return x, new_cache


def _batched(a: jax.Array | None) -> jax.Array | None:
    """flaxmodels takes a 1-D input as one sequence: (T,) -> (1, T)."""
    if a is None:
        return None
    a = jnp.asarray(a)
    return a[None] if a.ndim == 1 else a


class GPT2Model(nn.Module):
    """The transformer without the LM head; returns hidden states and the updated cache."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache: bool = False, segment_ids=None, collect_kv: bool = False,
                 branch_ids=None) -> dict[str, Any]:
        """segment_ids [B, T] (packed rows, no cache): tokens attend only within their segment
        and positions restart at each segment; 0 marks padding.

        branch_ids [B, T] (with segment_ids): a segment holding a shared prefix (branch 0) and
        several continuations of it (branches 1..k, one after the other): a branch token sees
        the prefix and its own branch only, so the prefix is computed once for all of them.
        Pass position_ids too (a branch's positions continue from the prefix's end).

        collect_kv (no cache): also return every layer's keys and values as
        out["layer_kv"] = (keys, values), tuples of [B, H, T, D]; generation prefills packed
        prompts this way and moves each prompt's entries into its own cache row."""
        cfg = self.config
        input_ids = _batched(input_ids)
        b, t = input_ids.shape
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else _batched(attention_mask).astype(bool))
        if segment_ids is not None:
            if past_key_values is not None or use_cache:
                raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
            segment_ids = _batched(segment_ids)
            mask = segment_ids > 0
        cache = past_key_values
        if cache is None and use_cache:
            cache = kv.init_cache(cfg, b, dtype=self.dtype)

        if cache is not None:
            _check_room(cache, t)
            start = cache.index
            full_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))  # [B, S]
            slot = jnp.arange(cache.max_length)
            causal = slot[None, :] <= start + jnp.arange(t)[:, None]  # [T, S]
            kv_mask = full_mask[:, None, :] & causal[None]  # [B, T, S]
            offset = cache.position[:, None]
        else:
            if t > cfg.n_positions:  # static: refused under jit too
                raise ValueError(f"{t} tokens exceed the model's context n_positions="
                                 f"{cfg.n_positions}; score longer texts in windows")
            causal = jnp.tril(jnp.ones((t, t), bool))
            kv_mask = mask[:, None, :] & causal[None]  # [B, T, T]
            offset = jnp.zeros((b, 1), jnp.int32)
            if segment_ids is not None:
                kv_mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
                if branch_ids is not None:
                    if position_ids is None:
                        raise ValueError("branch_ids need explicit position_ids")
                    branch_ids = _batched(branch_ids)
                    kv_mask &= ((branch_ids[:, None, :] == 0)
                                | (branch_ids[:, :, None] == branch_ids[:, None, :]))
                if position_ids is None:
                    position_ids = segment_positions(segment_ids)
        if position_ids is None:
            # Left pads do not advance the position: a padded row equals the same row unpadded.
            position_ids = offset + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        position_ids = _batched(position_ids)

        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=_init,
                       param_dtype=self.param_dtype, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=_init,
                       param_dtype=self.param_dtype, name="wpe")
        x = (wte(input_ids).astype(jnp.float32)
             + wpe(jnp.minimum(position_ids, cfg.n_positions - 1)).astype(jnp.float32))

        new_keys, new_values = [], []
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
            x, new_kv = Block(cfg, i, self.dtype, self.param_dtype, name=f"h_{i}")(
                x, kv_mask, layer_cache, collect_kv and cache is None)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        x = LayerNorm(cfg.layer_norm_epsilon, self.param_dtype, name="ln_f")(x)

        new_cache = None
        if cache is not None:
            new_cache = kv.KVCache(
                keys=tuple(new_keys), values=tuple(new_values), mask=full_mask,
                index=cache.index + t,
                position=cache.position + jnp.sum(mask, axis=1, dtype=jnp.int32),
            )
        out = {"last_hidden_state": x, "past_key_values": new_cache}
        if collect_kv and cache is None:
            out["layer_kv"] = (tuple(new_keys), tuple(new_values))
        return out


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: [1, 1, 2, 2, 2] -> [0, 1, 0, 1, 2]."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _check_room(cache: kv.KVCache, t: int) -> None:
    """dynamic_update_slice clamps out-of-range writes; refuse them while the index is known.

    Under jit the index is traced and only the static part (t > cache length) can be checked.
    """
    if t > cache.max_length:
        raise ValueError(f"{t} tokens do not fit a KV cache of length {cache.max_length}")
    if isinstance(cache.index, jax.core.Tracer):
        return
    if int(cache.index) + t > cache.max_length:
        raise ValueError(
            f"KV cache is full: {int(cache.index)} + {t} tokens exceed its length "
            f"{cache.max_length} (the model's context is at most n_positions)"
        )


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the language-model head, flaxmodels-style.

    `GPT2LMHeadModel(pretrained="gpt2")` (a Hub id or a local Hugging Face directory) reads the
    checkpoint's config.json; its `init` then returns the pretrained params instead of random ones.
    """

    config: GPT2Config | None = None
    pretrained: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.config is None:
            if self.pretrained is None:
                raise ValueError("GPT2LMHeadModel needs a config or pretrained=NAME_OR_PATH")
            object.__setattr__(self, "config", GPT2Config.from_pretrained(self.pretrained))
        super().__post_init__()

    def init(self, rngs, *args, **kwargs):  # noqa: D102 - same contract as linen's init
        if self.pretrained is not None:
            from gpt2model.weights import load_params

            return {"params": load_params(self.pretrained, self.config, self.param_dtype)}
        return super().init(rngs, *args, **kwargs)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache: bool = False) -> dict[str, Any]:
        """Returns {'logits' [B, T, V] float32, 'past_key_values', 'last_hidden_state'}."""
        cfg = self.config
        out = GPT2Model(cfg, self.dtype, self.param_dtype, name="transformer")(
            input_ids, attention_mask, position_ids, past_key_values, use_cache)
        h = out["last_hidden_state"]
        if cfg.tie_word_embeddings:
            head = self.variables["params"]["transformer"]["wte"]["embedding"]  # [V, E]
        else:  # stored (in, out) as the checkpoint's Flax Dense kernel
            head = self.param("lm_head", _init, (cfg.n_embd, cfg.vocab_size), self.param_dtype).T
        out["logits"] = head_logits(h, head, self.dtype)
        return out
