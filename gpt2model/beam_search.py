"""Beam search with transformers' semantics, the whole search one jitted program.

Follows `GenerationMixin._beam_search` of transformers 5.x (generation/utils.py) step for step:
the top 2N continuations over all N beams of a row, the best N of them not ending in eos run on,
those of the top N that end in eos (or reach max_new_tokens) join the row's N finished
hypotheses scored sum(log p) / length ** length_penalty (length = generated tokens, eos
included, prompt not), and the early-stopping heuristic decides when a row can stop improving.
Rows are prompts left-padded to a fixed length, the beams of a row are consecutive rows of the
KV cache ([B * N]), reordered by a gather along that axis each step. One compile serves every
call with the same (batch, prompt length, num_beams, max_new_tokens, early_stopping is True):
length_penalty and num_return_sequences are not part of the program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2model import cache as kv
from gpt2model.batching import left_pad
from gpt2model.config import GPT2Config
from gpt2model.model import GPT2Model, compute_params, head_logits, lm_head_weights

# transformers' "minus infinity" for beams that must not be picked; added, not assigned, so the
# arithmetic (and the ranking of the rest) is the same as there.
_NEG = -1.0e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeamSettings:
    """Beam search controls, as transformers' `generate` names them.

    early_stopping: True stops a row once it holds num_beams finished hypotheses; False stops it
    when the best running beam, scored at its current length, cannot beat the worst finished
    one; "never" scores it at max_new_tokens instead when length_penalty > 0 (transformers'
    canonical beam search).
    """

    num_beams: int = 4
    max_new_tokens: int = 32  # generated tokens per hypothesis at most (eos included)
    length_penalty: float = 1.0  # score = sum of log-probs / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1  # best hypotheses returned per prompt, 1..num_beams

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens", "num_return_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= "
                             f"num_beams ({self.num_beams})")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, int | float) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        object.__setattr__(self, "length_penalty", float(lp))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got "
                             f"{self.early_stopping!r}")

    @property
    def program(self) -> tuple[int, int, bool]:
        """What the jitted search depends on: (num_beams, max_new_tokens, stop when full)."""
        return int(self.num_beams), int(self.max_new_tokens), self.early_stopping is True

    def divisors(self) -> tuple[np.ndarray, np.ndarray]:
        """[max_new_tokens] float32 each: what step t divides summed log-probs by, for a
        hypothesis finishing there ((t + 1) ** length_penalty) and in the early-stopping
        heuristic (the same, or max_new_tokens ** length_penalty for "never" with a positive
        penalty). Computed in float64 and rounded once, as transformers' Python floats are."""
        m, lp = self.max_new_tokens, self.length_penalty
        finish = np.arange(1, m + 1, dtype=np.float64) ** lp
        heuristic = np.full(m, float(m) ** lp) if self.early_stopping == "never" and lp > 0 \
            else finish
        return finish.astype(np.float32), heuristic.astype(np.float32)


class Hypothesis(NamedTuple):
    """One returned sequence: generated ids (eos excluded) and transformers' sequence score."""

    token_ids: list[int]
    sequence_score: float


@struct.dataclass
class _BeamState:
    """The while_loop carry. B rows, N beams, M = max_new_tokens."""

    step: jax.Array  # [] int32: the generated token being chosen
    go: jax.Array  # [] bool: run another step
    cache: kv.KVCache  # [B * N] rows, beam n of row b at b * N + n
    logits: jax.Array  # [B * N, V] float32: next-token logits of the running beams
    running: jax.Array  # [B, N, M] int32: running beams' tokens (eos after the step)
    running_scores: jax.Array  # [B, N] float32: their summed log-probs, best first
    finished: jax.Array  # [B, N, M] int32: finished hypotheses' tokens
    finished_scores: jax.Array  # [B, N] float32: length-penalized, best first (-1e9 = none)
    is_finished: jax.Array  # [B, N] bool: the slot holds a finished hypothesis
    improvable: jax.Array  # [B] bool: transformers' is_early_stop_heuristic_unsatisfied


def _forward(cfg: GPT2Config, dtype: Any, params, ids: jax.Array, mask: jax.Array,
             cache: kv.KVCache) -> tuple[jax.Array, kv.KVCache]:
    """ids, mask [R, T] through the cache: last position's float32 logits [R, V], new cache."""
    out = GPT2Model(cfg, dtype).apply({"params": params["transformer"]}, ids,
                                      attention_mask=mask, past_key_values=cache, use_cache=True)
    head = lm_head_weights(params, cfg).astype(dtype)
    logits = head_logits(out["last_hidden_state"][:, -1], head, dtype)
    return logits, out["past_key_values"]


def _rows(tree: Any, index: jax.Array) -> Any:
    """Rows `index` of every batch-major leaf of a pytree (the cache's scalar index kept)."""
    return jax.tree.map(lambda a: a[index] if a.ndim else a, tree)


def _take(a: jax.Array, index: jax.Array) -> jax.Array:
    """a [B, K, ...] -> [B, J, ...] along axis 1 (transformers' _gather_beams)."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def _search(cfg: GPT2Config, dtype: Any, program: tuple[int, int, bool], eos_id: int, params,
            ids: jax.Array, mask: jax.Array, active: jax.Array, finish_div: jax.Array,
            heuristic_div: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Left-padded prompts ids, mask [B, P]; active [B] (False: a padding row) ->
    (finished tokens [B, N, M] int32, eos-filled; their scores [B, N] float32, best first)."""
    n, m, stop_when_full = program
    b, p = ids.shape
    k = 2 * n  # transformers' beams_to_keep with one eos id: max(2, 1 + 1) * num_beams
    params = compute_params(params, dtype)
    logits, cache = _forward(cfg, dtype, params, ids, mask,
                             kv.init_cache(cfg, b, p + m, dtype=dtype))
    # One prefill per prompt; its beams start as copies of it.
    beams = jnp.repeat(jnp.arange(b), n)
    logits, cache = logits[beams], _rows(cache, beams)
    v = logits.shape[-1]
    rows = jnp.arange(b)[:, None]

    def body(s: _BeamState) -> _BeamState:
        t = s.step
        logp = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1).reshape(b, n, v)
        logp = (logp + s.running_scores[:, :, None]).reshape(b, n * v)
        top, flat = jax.lax.top_k(logp, k)  # [B, K], best first
        src, token = flat // v, (flat % v).astype(jnp.int32)
        cand = _take(s.running, src).at[:, :, t].set(token)  # [B, K, M]
        hits = (token == eos_id) | (t == m - 1)  # [B, K]: eos or max length

        # The best N that did not stop run on (at most N of the 2N can end in eos).
        alive = top + hits.astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(alive, n)[1]  # [B, N]
        running, running_scores = _take(cand, keep), _take(alive, keep)
        origin = _take(src, keep)

        # Of the top N candidates, those that stopped compete for the row's finished slots.
        new = hits & (jnp.arange(k) < n)[None, :]
        score = top / finish_div[t]
        full = jnp.all(s.is_finished, axis=1, keepdims=True) & stop_when_full
        score = score + full.astype(jnp.float32) * _NEG
        score = score + (~s.improvable[:, None]).astype(jnp.float32) * _NEG
        score = score + (~new).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([s.finished_scores, score], axis=1)  # [B, N + K]
        pick = jax.lax.top_k(merged_scores, n)[1]
        finished = _take(jnp.concatenate([s.finished, cand], axis=1), pick)
        finished_scores = _take(merged_scores, pick)
        is_finished = _take(jnp.concatenate([s.is_finished, new], axis=1), pick)

        # Can the best running beam still beat the worst finished hypothesis?
        best = running_scores[:, :1] / heuristic_div[t]
        worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
        improvable = s.improvable & jnp.any(best > worst, axis=1)
        # Rows stop together; a stopped row's hypotheses are frozen, so leaving out padding
        # rows (and rows already done) changes no result. At t = M - 1 every candidate hits.
        go = (jnp.any(improvable & active)
              & ~(jnp.all(is_finished | ~active[:, None]) & stop_when_full) & (t + 1 < m))

        def advance():
            order = (rows * n + origin).reshape(-1)  # [B * N]: each new beam's parent row
            return _forward(cfg, dtype, params, running[:, :, t].reshape(-1, 1),
                            jnp.ones((b * n, 1), jnp.int32), _rows(s.cache, order))

        logits, cache = jax.lax.cond(go, advance, lambda: (s.logits, s.cache))
        return _BeamState(t + 1, go, cache, logits, running, running_scores, finished,
                          finished_scores, is_finished, improvable)

    init = _BeamState(
        step=jnp.zeros((), jnp.int32), go=jnp.ones((), bool), cache=cache,
        logits=logits.astype(jnp.float32),
        running=jnp.full((b, n, m), eos_id, jnp.int32),
        # Only beam 0 of each row counts at the first step: the copies would repeat it.
        running_scores=jnp.zeros((b, n), jnp.float32).at[:, 1:].set(_NEG),
        finished=jnp.full((b, n, m), eos_id, jnp.int32),
        finished_scores=jnp.full((b, n), _NEG, jnp.float32),
        is_finished=jnp.zeros((b, n), bool), improvable=jnp.ones((b,), bool))
    out = jax.lax.while_loop(lambda s: s.go, body, init)
    return out.finished, out.finished_scores


_jitted = jax.jit(_search, static_argnums=(0, 1, 2, 3))


def compile_count() -> int:
    """Beam search programs compiled so far in this process (one per (model config, dtype,
    batch, prompt length, BeamSettings.program, eos id))."""
    return _jitted._cache_size()


def beam_search(model_config: GPT2Config, params: Any, prompt_ids: Sequence[Sequence[int]],
                settings: BeamSettings, eos_id: int, dtype: Any = jnp.float32, *,
                prompt_length: int | None = None, batch_size: int | None = None,
                pad_id: int | None = None) -> list[list[Hypothesis]]:
    """Beam search each prompt; returns [prompt][returned sequence], best score first.

    Each hypothesis holds its generated ids (eos excluded) and the score transformers reports
    as `sequences_scores`. `prompt_length` and `batch_size` fix the padded shape (default: the
    longest prompt, the number of prompts) so calls share one compile; `pad_id` (default
    eos_id) fills the left padding, which the mask hides. Matmuls run in `dtype`; log-probs and
    scores are float32.
    """
    if not isinstance(settings, BeamSettings):
        raise TypeError(f"settings must be a BeamSettings, not {type(settings).__name__}")
    if not 0 <= eos_id < model_config.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size "
                         f"{model_config.vocab_size})")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts or any(not p for p in prompts):
        raise ValueError("beam_search needs at least one prompt, each with at least one token")
    length = prompt_length or max(map(len, prompts))
    rows = batch_size or len(prompts)
    if rows < len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not fit batch_size {rows}")
    if length + settings.max_new_tokens > model_config.n_positions:
        raise ValueError(f"prompt length {length} + max_new_tokens {settings.max_new_tokens} "
                         f"exceeds the model's context {model_config.n_positions}")
    ids, mask = left_pad(prompts, length, rows, eos_id if pad_id is None else pad_id)
    active = np.arange(rows) < len(prompts)
    finish_div, heuristic_div = settings.divisors()
    tokens, scores = jax.device_get(_jitted(
        model_config, jnp.dtype(dtype), settings.program, int(eos_id), params, ids, mask,
        active, finish_div, heuristic_div))
    return [[_hypothesis(tokens[r, j], scores[r, j], eos_id)
             for j in range(settings.num_return_sequences)] for r in range(len(prompts))]


def _hypothesis(tokens: np.ndarray, score: np.floating, eos_id: int) -> Hypothesis:
    tokens = [int(t) for t in tokens]
    n = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    return Hypothesis(tokens[:n], float(score))


__all__ = ["BeamSettings", "Hypothesis", "beam_search", "compile_count"]
