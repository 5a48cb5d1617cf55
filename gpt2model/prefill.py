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
from gpt2model.batching import PrefillPlan
from gpt2model.model import GPT2LMHeadModel, GPT2Model, head_logits, lm_head_weights
from gpt2model.scoring import head_scores


def prefill(model: GPT2LMHeadModel, n_new: int, params, plan: PrefillPlan, echo: bool = False):
    """Run the packed prompts once; return the last prompt token's logits [B, V] and the
    left-padded cache [B, H, P + n_new, D] holding every prompt's keys and values; with `echo`
    also the prompts' token log-probs [B, P] (see `prompt_logprobs`)."""
    cfg = model.config
    p = plan.ids.shape[1]
    b = plan.row.shape[0]
    out = GPT2Model(cfg, model.dtype, model.param_dtype).apply(
        {"params": params["transformer"]}, plan.ids, segment_ids=plan.segments, collect_kv=True)
    keys, values = out["layer_kv"]  # [R, H, P, D] each
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
    hidden = out["last_hidden_state"]  # [R, P, E]
    last = hidden[plan.row, plan.start + plan.lengths - 1]  # [B, E]
    head = lm_head_weights(params, cfg).astype(model.dtype)
    logits = head_logits(last, head, model.dtype, cfg.tie_word_embeddings)
    if not echo:
        return logits, cache
    packed = prompt_logprobs(model, params, hidden, plan)  # [R, P]
    by_row = packed[plan.row[:, None], src]  # [B, P], left-padded like the cache
    return logits, cache, jnp.where(slots[None, :] > first[:, None], by_row, 0.0)


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
