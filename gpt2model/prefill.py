"""The prefill: packed prompts through the model once, into the left-padded cache the decode loop
reads; with `echo`, also every prompt token's log-prob from the same forward pass.

`gpt2model.batching.plan_prefill` decides where each distinct prompt sits in the packed rows;
batch rows sharing a prompt gather the same packed keys, values and logits, so the samples of
one record cost one prefill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2model import cache as kv
from gpt2model.batching import PrefillPlan, pass_rows
from gpt2model.model import GPT2LMHeadModel, GPT2Model, head_logits, lm_head_weights
from gpt2model.scoring import head_scores


def prefill(model: GPT2LMHeadModel, n_new: int, params, plan: PrefillPlan, echo: bool = False,
            token_budget: int | None = None, row_multiple: int = 1):
    """Run the packed prompts once; return the last prompt token's logits [B, V] and the
    left-padded cache [B, H, P + n_new, D] holding every prompt's keys and values; with `echo`
    also the prompts' token log-probs [B, P] (see `prompt_logprobs`).

    token_budget: tokens per forward pass (`batching.step_token_budget`; None: all packed
    rows in one pass); row_multiple: the device count the rows are split over."""
    cfg = model.config
    p = plan.ids.shape[1]
    b = plan.row.shape[0]
    hidden, (keys, values) = packed_forward(model, params, plan.ids, plan.segments,
                                            pass_rows(plan.ids.shape[0], p, token_budget,
                                                      row_multiple))
    first = p - plan.lengths  # [B] first real slot of each left-padded cache row
    slots = jnp.arange(p)
    src = jnp.clip(plan.start[:, None] + slots[None, :] - first[:, None], 0, p - 1)  # [B, P]

    def to_rows(a: jax.Array) -> jax.Array:  # [R, H, P, D] -> [B, H, P, D], left-padded
        return a.transpose(0, 2, 1, 3)[plan.row[:, None], src].transpose(0, 2, 1, 3)

    cache = kv.init_cache(cfg, b, p + n_new, dtype=model.dtype)
    cache = cache.replace(
        keys=tuple(kv.write(c, to_rows(k), 0) for c, k in zip(cache.keys, keys, strict=True)),
        values=tuple(kv.write(c, to_rows(v), 0)
                     for c, v in zip(cache.values, values, strict=True)),
        mask=cache.mask.at[:, :p].set(slots[None, :] >= first[:, None]),
        index=jnp.asarray(p, jnp.int32),
        position=plan.lengths.astype(jnp.int32),
    )
    last = hidden[plan.row, plan.start + plan.lengths - 1]  # [B, E]
    head = lm_head_weights(params, cfg).astype(model.dtype)
    logits = head_logits(last, head, model.dtype)
    if not echo:
        return logits, cache
    packed = prompt_logprobs(model, params, hidden, plan)  # [R, P]
    by_row = packed[plan.row[:, None], src]  # [B, P], left-padded like the cache
    return logits, cache, jnp.where(slots[None, :] > first[:, None], by_row, 0.0)


def packed_forward(model: GPT2LMHeadModel, params, ids: jax.Array, segments: jax.Array,
                   rows_per_pass: int) -> tuple[jax.Array, tuple[tuple[jax.Array, ...], ...]]:
    """The transformer over packed rows ids, segments [R, P], `rows_per_pass` rows at a time:
    (hidden states [R, P, E], (keys, values) per layer [R, H, P, D]).

    Several passes run as one `lax.map` (one compiled body). Pass i takes rows i, n + i, 2n + i,
    ... (n passes), so a batch split by rows over devices keeps every device busy in every pass;
    rows added to fill the last pass are segment 0 (attend to nothing) and are dropped after.
    """
    transformer = GPT2Model(model.config, model.dtype, model.param_dtype)

    def run(ids: jax.Array, segments: jax.Array):
        out = transformer.apply({"params": params["transformer"]}, ids, segment_ids=segments,
                                collect_kv=True)
        return out["last_hidden_state"], out["layer_kv"]

    r = ids.shape[0]
    if rows_per_pass >= r:
        return run(ids, segments)
    n = -(-r // rows_per_pass)
    fill = n * rows_per_pass - r

    def split(a: jax.Array) -> jax.Array:  # [R, ...] -> [n, rows_per_pass, ...]
        a = jnp.pad(a, ((0, fill), *[(0, 0)] * (a.ndim - 1)))
        return a.reshape(rows_per_pass, n, *a.shape[1:]).swapaxes(0, 1)

    def merge(a: jax.Array) -> jax.Array:  # [n, rows_per_pass, ...] -> [R, ...]
        return a.swapaxes(0, 1).reshape(n * rows_per_pass, *a.shape[2:])[:r]

    out = jax.lax.map(lambda x: run(*x), (split(ids), split(segments)))
    return jax.tree_util.tree_map(merge, out)


def prompt_logprobs(model: GPT2LMHeadModel, params, hidden: jax.Array, plan: PrefillPlan
                    ) -> jax.Array:
    """log p(token | the tokens of its prompt before it) at every packed position [R, P]
    float32; 0 where there is no such token (a prompt's first, padding).

    Position j's logits score token j + 1 when both belong to one prompt. The LM head and its
    log-sum-exp run in row chunks (`scoring.head_scores`), so no [R, P, V] array is built.
    """
    seg = plan.segments
    follows = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)  # [R, P - 1]
    targets = jnp.pad(plan.ids[:, 1:], ((0, 0), (0, 1)))  # [R, P] the next packed token
    scored = jnp.pad(follows, ((0, 0), (0, 1))).astype(jnp.int32)
    lp, _ = head_scores(model, params, hidden, targets, scored)  # [R, P] of token j + 1
    return jnp.pad(lp[:, :-1], ((0, 0), (1, 0)))  # [R, P] of token j
