"""Workload 6: where the time goes, ours only: the profile behind each missed target.

XLA's CPU backend has no per-op timeline worth reading for a fused program, so each part of
the model step is timed as its own jitted program at the same shapes, on the same weights:

- scoring, per dtype and batch shape: the whole step (`Scorer`), the transformer alone, the
  LM head + log-softmax alone (`head_scores` on given hidden states), one layer's attention
  (`causal_attend` on q, k, v of the real shape) times the layers, and the layer matmuls
  (`matmul` at the four projection shapes) times the layers; "other" is the transformer minus
  attention and matmuls (layer norms, GELU, residual adds, casts, embedding).
- generation: the packed prefill and one decode step (from the time of 1 vs 1 + k new tokens),
  with the decode step's matmul, attention and head parts timed alone the same way.

Parts timed alone miss fusion across their edges, so they need not sum to the whole exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import jax_dtype, log, time_interleaved
from bench.models import checkpoint, load_ours


def _timed(fn, *args, repeats: int) -> dict[str, Any]:
    """Spread of seconds of `fn(*args)` (blocked on), timed the harness's usual way."""
    import jax

    return time_interleaved({"part": lambda: jax.block_until_ready(fn(*args))},
                            repeats)["part"]["seconds"]


def _layer_matmuls(config, tokens: int, dtype, repeats: int) -> dict[str, Any]:
    """One layer's four projections (c_attn, attn c_proj, c_fc, mlp c_proj) on `tokens` rows."""
    import jax
    import jax.numpy as jnp

    from gpt2model.model import matmul

    e, inner = config.n_embd, config.inner_dim
    rng = np.random.default_rng(0)
    shapes = [(e, 3 * e), (e, e), (e, inner), (inner, e)]
    xs = {k: jnp.asarray(rng.normal(size=(tokens, k)), jnp.float32) for k in {e, inner}}
    ws = [jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32).astype(dtype) for s in shapes]
    fn = jax.jit(lambda xs, ws: [matmul(xs[w.shape[0]], w, dtype) for w in ws])
    return _timed(fn, xs, ws, repeats=repeats)


def _attention(config, batch: int, queries: int, keys: int, dtype, repeats: int,
               causal: bool) -> dict[str, Any]:
    """One layer's attention: blocked causal self-attention, or queries over a cache."""
    import jax
    import jax.numpy as jnp

    from gpt2model.model import attend, causal_attend

    h, d = config.n_head, config.head_dim
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(batch, h, queries, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, h, keys, d)), dtype) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((queries, keys), bool), keys - queries)[None]
                       .repeat(batch, 0))
    fn = causal_attend if causal else attend
    return _timed(jax.jit(lambda q, k, v, m: fn(q, k, v, m, 0.125, dtype)), q, k, v, mask,
                  repeats=repeats)


def _scoring_entry(config, params, dtype_name: str, rows: int, length: int, repeats: int
                   ) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from gpt2model import Scorer
    from gpt2model.model import GPT2Model
    from gpt2model.scoring import head_scores

    dtype = jax_dtype(dtype_name)
    scorer = Scorer(config, params, dtype=dtype)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (rows, length)), jnp.int32)
    seg = jnp.ones_like(ids)
    transformer = GPT2Model(config, dtype)
    hidden = jax.jit(lambda p, i: transformer.apply({"params": p["transformer"]}, i,
                                                    segment_ids=seg)["last_hidden_state"])
    h = hidden(scorer.params, ids)
    head = jax.jit(lambda p, h, t, s: head_scores(scorer.model, p, h, t, s))
    n = config.n_layer
    parts = {
        "step": _timed(scorer, ids, ids, seg, repeats=repeats),
        "transformer": _timed(hidden, scorer.params, ids, repeats=repeats),
        "head_logsoftmax": _timed(head, scorer.params, h, ids, seg, repeats=repeats),
        "attention_1_layer": _attention(config, rows, length, length, dtype, repeats, True),
        "matmuls_1_layer": _layer_matmuls(config, rows * length, dtype, repeats),
    }
    ms = {k: v["median"] * 1e3 for k, v in parts.items()}
    ms["attention"] = ms.pop("attention_1_layer") * n
    ms["matmuls"] = ms.pop("matmuls_1_layer") * n
    ms["other"] = ms["transformer"] - ms["attention"] - ms["matmuls"]
    return {"kind": "scoring", "dtype": dtype_name, "rows": rows, "length": length,
            "tokens": rows * length, "ms": ms, "raw": parts}


def _generation_entry(config, params, tokenizer, dtype_name: str, prompts: int, steps: int,
                      repeats: int, lengths: tuple[int, int]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from bench.generation import prompts as make_prompts
    from gpt2model import Generator, SamplingConfig
    from gpt2model.generation import record_seed
    from gpt2model.model import head_logits

    dtype = jax_dtype(dtype_name)
    gen = Generator(config, params, tokenizer, dtype=dtype)
    ids, mask = make_prompts(prompts, config.vocab_size, prompts, *lengths)
    seeds = np.stack([record_seed(0, i) for i in range(prompts)])

    def decode(k: int):
        return lambda: gen.decode_batch(ids, mask, seeds, SamplingConfig(max_new_tokens=k))

    one, more = (_timed(decode(k), repeats=repeats) for k in (1, 1 + steps))
    step_ms = (more["median"] - one["median"]) / steps * 1e3
    cache = ids.shape[1] + 1 + steps
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(prompts, config.n_embd)), jnp.float32)
    wte = gen.params["transformer"]["wte"]["embedding"]
    head = jax.jit(lambda x, w: jnp.argmax(head_logits(x, w, dtype), -1))
    n = config.n_layer
    ms = {
        "prefill_and_first_token": one["median"] * 1e3,
        "decode_step": step_ms,
        "matmuls": _layer_matmuls(config, prompts, dtype, repeats)["median"] * 1e3 * n,
        "attention_over_cache": _attention(config, prompts, 1, cache, dtype, repeats,
                                           False)["median"] * 1e3 * n,
        "head_argmax": _timed(head, x, wte, repeats=repeats)["median"] * 1e3,
    }
    ms["other"] = ms["decode_step"] - ms["matmuls"] - ms["attention_over_cache"] \
        - ms["head_argmax"]
    return {"kind": "generation", "dtype": dtype_name, "prompts": prompts,
            "prompt_length": int(ids.shape[1]), "cache_length": cache, "ms": ms}


def run(ctx) -> dict[str, Any]:
    from gpt2model import get_tokenizer

    size = ctx.sizes[0]
    path = checkpoint(size, ctx.cache_dir)
    config, params = load_ours(path)
    tokenizer = get_tokenizer(path)
    entries = []
    for dtype in ctx.dtypes:
        for length in sorted({min(ctx.lengths), max(ctx.lengths)}):
            rows = max(1, ctx.batch_tokens // length)
            log(f"profile: scoring {size} {dtype} {rows}x{length}")
            entries.append(_scoring_entry(config, params, dtype, rows, length, ctx.repeats))
    for dtype in ctx.gen_dtypes:
        n = max(ctx.prompt_counts)
        log(f"profile: generation {size} {dtype} {n} prompts")
        entries.append(_generation_entry(config, params, tokenizer, dtype, n,
                                         min(16, ctx.new_tokens), ctx.repeats,
                                         ctx.prompt_lengths))
    return {"size": size, "entries": entries}
