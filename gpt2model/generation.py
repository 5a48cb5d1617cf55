"""Generation: the whole decode loop jitted on the device, with per-record reproducible sampling.

Prompts are left-padded to a fixed length; the cache holds prompt + max_new_tokens slots, so one
compile serves every call with the same (batch, prompt length, settings). Sampling keys derive
from (seed, record key, sample index) and the step, never from the row's position in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2model import cache as kv
from gpt2model.batching import PrefillPlan, left_pad, plan_prefill
from gpt2model.config import GPT2Config, SamplingConfig
from gpt2model.model import (
    GPT2LMHeadModel,
    GPT2Model,
    compute_params,
    head_logits,
    lm_head_weights,
)

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One continuation to generate: the record it belongs to, which sample, the prompt."""

    key: str | int  # identifies the record's random stream (with the seed and sample index)
    sample_index: int
    prompt_ids: tuple[int, ...]


@dataclasses.dataclass
class Generation:
    """One sample: generated ids (eos excluded), text, model log-probs per token, finish reason."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def record_seed(seed: int, record_key: str | int, sample_index: int = 0) -> np.ndarray:
    """Four uint32 words identifying a record's random stream (stable across runs and hosts)."""
    digest = hashlib.blake2b(str(record_key).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    hi, lo = np.frombuffer(digest, dtype=">u4")
    return np.array([seed & 0xFFFFFFFF, hi, lo, sample_index], np.uint32)


def _bisect_threshold(values: jax.Array, enough, lo: jax.Array, hi: jax.Array,
                      iters: int = 40) -> jax.Array:
    """Largest t in [lo, hi] per row with enough(values >= t) true, found by bisection.

    `enough(keep)` maps a [B, V] bool mask to [B] bools and must be monotone in t (true at lo).
    40 halvings take the bracket below float32 spacing, so the threshold lands exactly on a
    value of the row: the filters below then match sort-based ones, ties included, at a fraction
    of the cost of sorting or `lax.top_k` over the vocabulary (BENCHMARKS.md, "Design
    measurements").
    """

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = enough(values >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iters, step, (lo, hi))[0][:, None]  # [B, 1]


def filter_logits(logits: jax.Array, settings: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to [B, V] float32 logits (removed entries = -inf).

    Top-k keeps the logits >= the k-th largest (ties kept, as Hugging Face does); top-p keeps
    the nucleus {p >= tau} for the largest tau whose probability mass is >= top_p. Both
    thresholds come from bisection rather than sorting the vocabulary every step.
    """
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        k = settings.top_k
        kth = _bisect_threshold(logits, lambda keep: jnp.sum(keep, axis=-1) >= k,
                                jnp.min(logits, axis=-1), jnp.max(logits, axis=-1))
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        p = settings.top_p
        tau = _bisect_threshold(
            probs, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= p,
            jnp.zeros(probs.shape[0]), jnp.max(probs, axis=-1))
        logits = jnp.where(probs >= tau, logits, -jnp.inf)
    return logits


def _prefill(model: GPT2LMHeadModel, n_new: int, params, plan: PrefillPlan):
    """Run the packed prompts once; return the last prompt token's logits [B, V] and the
    left-padded cache [B, H, P + n_new, D] holding every prompt's keys and values."""
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
    last = out["last_hidden_state"][plan.row, plan.start + plan.lengths - 1]  # [B, E]
    head = lm_head_weights(params, cfg).astype(model.dtype)
    return head_logits(last, head, model.dtype, cfg.tie_word_embeddings), cache


def _decode(model: GPT2LMHeadModel, settings: SamplingConfig, eos_id: int, params,
            logits: jax.Array, cache: kv.KVCache, seeds):
    """From the prefill's logits [B, V] and cache, with seeds [B, 4] uint32 -> new tokens and
    their log-probs [B, N]. Jitted apart from the prefill, whose packed shape varies."""
    b = logits.shape[0]
    n_new = settings.max_new_tokens
    cfg = model.config
    transformer = GPT2Model(cfg, model.dtype, model.param_dtype)
    head = lm_head_weights(params, cfg).astype(model.dtype)

    def forward(ids, mask, cache):
        """Run tokens through the cache; LM-head logits of the last position only [B, V]."""
        out = transformer.apply({"params": params["transformer"]}, ids, attention_mask=mask,
                                past_key_values=cache, use_cache=True)
        last = out["last_hidden_state"][:, -1]
        return head_logits(last, head, model.dtype, cfg.tie_word_embeddings), \
            out["past_key_values"]

    row_keys = jax.vmap(_row_key)(seeds)

    def choose(logits, step):
        logits = logits.astype(jnp.float32)  # [B, V]
        # The chosen token's log-prob is its logit minus the log-sum-exp: no [B, V] log_softmax.
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        if settings.greedy:
            token = jnp.argmax(logits, axis=-1)
        else:
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
            filtered = filter_logits(logits, settings)
            token = jax.vmap(jax.random.categorical)(keys, filtered)
        token = token.astype(jnp.int32)
        return token, (jnp.take_along_axis(logits, token[:, None], axis=-1) - lse)[:, 0]

    def cond(state):
        step, _, _, _, _, done = state
        return (step < n_new) & ~jnp.all(done)

    def body(state):
        step, cache, logits, tokens, logps, done = state
        token, logp = choose(logits, step)
        token = jnp.where(done, eos_id, token)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        live = ~done
        done = done | (token == eos_id)
        # The last step's token needs no forward pass: nothing will be sampled after it.
        logits, cache = jax.lax.cond(
            step + 1 < n_new, lambda: forward(token[:, None], live[:, None], cache),
            lambda: (logits, cache))
        return step + 1, cache, logits, tokens, logps, done

    init = (jnp.zeros((), jnp.int32), cache, logits,
            jnp.full((b, n_new), eos_id, jnp.int32), jnp.zeros((b, n_new), jnp.float32),
            jnp.zeros((b,), bool))
    _, _, _, tokens, logps, _ = jax.lax.while_loop(cond, body, init)
    return tokens, logps


def _row_key(seed_words: jax.Array) -> jax.Array:
    key = jax.random.key(seed_words[0])
    for word in (seed_words[1], seed_words[2], seed_words[3]):
        key = jax.random.fold_in(key, word)
    return key


class Generator:
    """A model bound to its params and tokenizer, with the jitted decode loop.

    Compiles once per (batch size, prompt length, SamplingConfig) and packed prefill size (at
    most PREFILL_STEPS of them); `compile_count` tells.
    """

    def __init__(self, config: GPT2Config, params: Any, tokenizer: Any, dtype: Any = jnp.float32,
                 put_batch: Callable[..., tuple[jax.Array, ...]] | None = None,
                 row_multiple: int = 1):
        """put_batch places batch-major host arrays on the devices (default: jax.device_put);
        a data-parallel caller passes its sharding and its device count as row_multiple."""
        self.config = config
        self.params = compute_params(params, dtype)
        self.tokenizer = tokenizer
        self.model = GPT2LMHeadModel(config, dtype=dtype)
        self.eos_id = int(tokenizer.eos_token_id)
        self.put_batch = put_batch or (lambda *arrays: tuple(jax.device_put(a) for a in arrays))
        self.row_multiple = row_multiple
        self._prefills: dict[int, Any] = {}  # by max_new_tokens (the cache length)
        self._fns: dict[SamplingConfig, Any] = {}

    @property
    def compile_count(self) -> int:
        """Programs compiled so far: prefills (one per packed shape) and decode loops."""
        return sum(fn._cache_size() for fn in (*self._prefills.values(), *self._fns.values()))

    def decode_batch(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, seeds: np.ndarray,
                     settings: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
        """The raw jitted call on fixed-shape arrays: (tokens [B, N], logprobs [B, N])."""
        if prompt_ids.shape[1] + settings.max_new_tokens > self.config.n_positions:
            raise ValueError(
                f"prompt length {prompt_ids.shape[1]} + max_new_tokens "
                f"{settings.max_new_tokens} exceeds the model's context {self.config.n_positions}"
            )
        plan = plan_prefill(prompt_ids, prompt_mask, self.eos_id, self.row_multiple)
        n_new = settings.max_new_tokens
        if n_new not in self._prefills:
            self._prefills[n_new] = jax.jit(functools.partial(_prefill, self.model, n_new))
        program = settings.program
        fn = self._fns.get(program)
        if fn is None:
            fn = jax.jit(functools.partial(_decode, self.model, program, self.eos_id))
            self._fns[program] = fn
        plan = plan.replace(**dict(zip(
            ("ids", "segments", "row", "start", "lengths"),
            self.put_batch(plan.ids, plan.segments, plan.row, plan.start, plan.lengths),
            strict=True)))
        (seeds,) = self.put_batch(np.asarray(seeds))
        logits, cache = self._prefills[n_new](self.params, plan)
        return jax.device_get(fn(self.params, logits, cache, seeds))

    def run_batch(self, samples: Sequence[Sample], settings: SamplingConfig, *, seed: int,
                  length: int, rows: int) -> list[Generation]:
        """Generate one batch: samples left-padded to [rows, length], one decode loop, cut.

        The one generation path: `generate` and the pipeline's model step both call this, so
        padding, per-record random streams and the finishing rules cannot drift apart.
        """
        ids, mask = left_pad([s.prompt_ids for s in samples], length, rows, self.eos_id)
        seeds = np.zeros((rows, 4), np.uint32)
        for r, s in enumerate(samples):
            seeds[r] = record_seed(seed, s.key, s.sample_index)
        tokens, logps = self.decode_batch(ids, mask, seeds, settings)
        return [finish(tokens[r], logps[r], self.tokenizer, self.eos_id, settings.stop)
                for r in range(len(samples))]

    def generate(self, prompts: Sequence[str | Sequence[int]], *, settings: SamplingConfig,
                 seed: int = 0, keys: Sequence[str | int] | None = None, num_samples: int = 1,
                 stop: Sequence[str] | None = None, prompt_length: int | None = None,
                 batch_size: int | None = None) -> list[list[Generation]]:
        """Generate `num_samples` continuations per prompt; returns [prompt][sample].

        `keys` identify records for the random streams (default: the prompt's index);
        `prompt_length` pads prompts to a fixed length so calls share one compile; `stop`, when
        given, replaces `settings.stop`.
        """
        if stop is not None:
            settings = dataclasses.replace(settings, stop=tuple(stop))
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
        if any(not p for p in ids):
            raise ValueError("a prompt is empty: there is nothing to condition on")
        keys = list(range(len(ids))) if keys is None else list(keys)
        samples = [Sample(keys[i], s, tuple(ids[i]))
                   for i in range(len(ids)) for s in range(num_samples)]
        length = prompt_length or max((len(p) for p in ids), default=1)
        batch_size = batch_size or len(samples) or 1
        results: list[list[Generation]] = [[] for _ in ids]
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            done = self.run_batch(chunk, settings, seed=seed, length=length, rows=batch_size)
            for offset, generation in enumerate(done):
                results[(start + offset) // num_samples].append(generation)
        return results


def finish(tokens: np.ndarray, logprobs: np.ndarray, tokenizer: Any, eos_id: int,
           stop: Sequence[str]) -> Generation:
    """Cut a decoded row at eos or at the first stop string; set the finish reason.

    On a stop string the text ends before it and the tokens end with the one that completed it.
    """
    tokens = [int(t) for t in tokens]
    n = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    reason = FINISH_EOS if n < len(tokens) else FINISH_LENGTH
    tokens, logprobs = tokens[:n], [float(x) for x in logprobs[:n]]
    text = tokenizer.decode(tokens)
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if cuts:
        pos, _ = min(cuts)
        text = text[:pos]
        keep = next(k for k in range(1, len(tokens) + 1)
                    if any(s in tokenizer.decode(tokens[:k]) for s in stop if s))
        tokens, logprobs, reason = tokens[:keep], logprobs[:keep], FINISH_STOP
    return Generation(tokens, text, logprobs, reason)
