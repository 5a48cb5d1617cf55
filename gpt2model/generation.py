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
from flax import struct

from gpt2model import cache as kv
from gpt2model import processors
from gpt2model.batching import left_pad, plan_prefill
from gpt2model.config import GPT2Config, SamplingConfig
from gpt2model.model import (
    GPT2LMHeadModel,
    GPT2Model,
    compute_params,
    head_logits,
    lm_head_weights,
)
from gpt2model.prefill import prefill as _prefill
from gpt2model.processors import _bisect_threshold, filter_logits  # noqa: F401 (moved there)

FINISH_EOS, FINISH_STOP, FINISH_LENGTH, FINISH_STOP_TOKEN = "eos", "stop", "length", "stop_token"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One continuation to generate: the record it belongs to, which sample, the prompt."""

    key: str | int  # identifies the record's random stream (with the seed and sample index)
    sample_index: int
    prompt_ids: tuple[int, ...]


@dataclasses.dataclass
class Generation:
    """One sample: generated ids (eos / stop token excluded), text, model log-probs per token,
    finish reason (eos, stop_token, stop or length); the extras are None unless asked for."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    # With top_logprobs = K: per generated token the K most likely ids and their log-probs,
    # most likely first, from the same raw distribution as `logprobs`.
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    # With echo: per prompt token its log-prob given the tokens before it; None for the first.
    prompt_logprobs: list[float | None] | None = None


def record_seed(seed: int, record_key: str | int, sample_index: int = 0) -> np.ndarray:
    """Four uint32 words identifying a record's random stream (stable across runs and hosts)."""
    digest = hashlib.blake2b(str(record_key).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    hi, lo = np.frombuffer(digest, dtype=">u4")
    return np.array([seed & 0xFFFFFFFF, hi, lo, sample_index], np.uint32)


@struct.dataclass
class _LoopState:
    """The decode loop's carry."""

    cache: kv.KVCache
    logits: jax.Array  # [B, V] the model's next-token logits
    history: processors.History  # prompt + generated ids [B, P + N], and the step
    logps: jax.Array  # [B, N] float32 model log-probs of the chosen tokens
    done: jax.Array  # [B] bool: the row produced eos or a stop token
    # With top_logprobs = K: ids [B, N, K] int32 and log-probs [B, N, K] float32; else None,
    # so a loop without them carries (and traces) nothing.
    top: tuple[jax.Array, jax.Array] | None = None


def _decode(model: GPT2LMHeadModel, settings: SamplingConfig, eos_id: int, params,
            logits: jax.Array, cache: kv.KVCache, seeds, prompt_ids: jax.Array):
    """From the prefill's logits [B, V] and cache, with seeds [B, 4] uint32 and the left-padded
    prompts [B, P] -> {"tokens", "logprobs"} [B, N], and with top_logprobs = K "top_ids" and
    "top_logprobs" [B, N, K]. Jitted apart from the prefill, whose packed shape varies.

    Each step's logits go through `processors.apply` (penalties, bans, bias; warpers when
    sampling) before the argmax or the draw; the log-probs reported (the chosen token's and the
    top K) are the model's own, from the unprocessed logits.
    """
    b, vocab = logits.shape
    n_new = settings.max_new_tokens
    k = settings.top_logprobs
    if k > vocab:
        raise ValueError(f"top_logprobs={k} exceeds the model's vocabulary of {vocab}")
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

    def choose(logits, history):
        logits = logits.astype(jnp.float32)  # [B, V]
        # The chosen token's log-prob is its logit minus the log-sum-exp: no [B, V] log_softmax.
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        processed = processors.apply(logits, history, settings)
        if settings.greedy:
            token = jnp.argmax(processed, axis=-1)
        else:
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, history.step)
            token = jax.vmap(jax.random.categorical)(keys, processed)
        token = token.astype(jnp.int32)
        logp = (jnp.take_along_axis(logits, token[:, None], axis=-1) - lse)[:, 0]
        if not k:
            return token, logp, None
        values, ids = jax.lax.top_k(logits, k)  # [B, K], most likely first
        return token, logp, (ids.astype(jnp.int32), values - lse)

    def cond(state):
        return (state.history.step < n_new) & ~jnp.all(state.done)

    def body(state):
        step = state.history.step
        token, logp, top = choose(state.logits, state.history)
        token = jnp.where(state.done, eos_id, token)
        live = ~state.done
        if top is not None:
            top = tuple(buf.at[:, step].set(jnp.where(live[:, None], new, 0))
                        for buf, new in zip(state.top, top, strict=True))
        history = state.history.append(token, live)
        done = state.done | history.ends(token)
        # The last step's token needs no forward pass: nothing will be sampled after it.
        logits, cache = jax.lax.cond(
            step + 1 < n_new, lambda: forward(token[:, None], live[:, None], state.cache),
            lambda: (state.logits, state.cache))
        return _LoopState(cache=cache, logits=logits, history=history,
                          logps=state.logps.at[:, step].set(jnp.where(live, logp, 0.0)),
                          done=done, top=top)

    p = prompt_ids.shape[1]
    history = processors.History.start(prompt_ids, cache.mask[:, :p], n_new,
                                       (eos_id, *settings.stop_token_ids))
    top = None
    if k:
        top = (jnp.zeros((b, n_new, k), jnp.int32), jnp.zeros((b, n_new, k), jnp.float32))
    init = _LoopState(cache=cache, logits=logits, history=history,
                      logps=jnp.zeros((b, n_new), jnp.float32), done=jnp.zeros((b,), bool),
                      top=top)
    state = jax.lax.while_loop(cond, body, init)
    out = {"tokens": state.history.generated[0], "logprobs": state.logps}
    if k:
        out["top_ids"], out["top_logprobs"] = state.top
    return out


def _row_key(seed_words: jax.Array) -> jax.Array:
    key = jax.random.key(seed_words[0])
    for word in (seed_words[1], seed_words[2], seed_words[3]):
        key = jax.random.fold_in(key, word)
    return key


class Generator:
    """A model bound to its params and tokenizer, with the jitted decode loop.

    Compiles once per (batch size, prompt length, SamplingConfig) and packed prefill size (at
    most PREFILL_STEPS of them); `compile_count` tells. Stop strings never select a program;
    `echo` selects the prefill only, `top_logprobs` the decode loop only.
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
        self._prefills: dict[tuple[int, bool], Any] = {}  # by (cache length - P, echo)
        self._fns: dict[SamplingConfig, Any] = {}
        # The last call's prefill work: distinct prompts (padding rows' one included) and their
        # tokens. Samples of one prompt share its prefill, so this can be below the batch size.
        self.last_prefill_rows = 0
        self.last_prefill_tokens = 0

    @property
    def compile_count(self) -> int:
        """Programs compiled so far: prefills (one per packed shape) and decode loops."""
        return sum(fn._cache_size() for fn in (*self._prefills.values(), *self._fns.values()))

    def decode(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, seeds: np.ndarray,
               settings: SamplingConfig, same_as: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
        """The raw jitted calls on fixed-shape arrays: "tokens" and "logprobs" [B, N]; with
        top_logprobs = K "top_ids" and "top_logprobs" [B, N, K]; with echo "prompt_logprobs"
        [B, P], left-padded like the prompts (0 at pads and at each prompt's first token).
        `same_as` marks rows repeating another row's prompt (see `plan_prefill`)."""
        if prompt_ids.shape[1] + settings.max_new_tokens > self.config.n_positions:
            raise ValueError(
                f"prompt length {prompt_ids.shape[1]} + max_new_tokens "
                f"{settings.max_new_tokens} exceeds the model's context {self.config.n_positions}"
            )
        plan = plan_prefill(prompt_ids, prompt_mask, self.eos_id, self.row_multiple,
                            same_as=same_as)
        owners = np.unique(plan.segments[plan.segments > 0]) - 1
        self.last_prefill_rows = len(owners)
        self.last_prefill_tokens = int(plan.lengths[owners].sum())
        key = (settings.max_new_tokens, settings.echo)
        if key not in self._prefills:
            self._prefills[key] = jax.jit(functools.partial(
                _prefill, self.model, settings.max_new_tokens, echo=settings.echo))
        program = dataclasses.replace(settings.program, echo=False)  # echo: the prefill's
        fn = self._fns.get(program)
        if fn is None:
            fn = jax.jit(functools.partial(_decode, self.model, program, self.eos_id))
            self._fns[program] = fn
        plan = plan.replace(**dict(zip(
            ("ids", "segments", "row", "start", "lengths"),
            self.put_batch(plan.ids, plan.segments, plan.row, plan.start, plan.lengths),
            strict=True)))
        seeds, prompt_ids = self.put_batch(np.asarray(seeds), np.asarray(prompt_ids, np.int32))
        logits, cache, *echo = self._prefills[key](self.params, plan)
        out = fn(self.params, logits, cache, seeds, prompt_ids)
        if echo:
            out["prompt_logprobs"] = echo[0]
        return jax.device_get(out)

    def decode_batch(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, seeds: np.ndarray,
                     settings: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
        """`decode`'s (tokens [B, N], logprobs [B, N]) only."""
        out = self.decode(prompt_ids, prompt_mask, seeds, settings)
        return out["tokens"], out["logprobs"]

    def run_batch(self, samples: Sequence[Sample], settings: SamplingConfig, *, seed: int,
                  length: int, rows: int) -> list[Generation]:
        """Generate one batch: samples left-padded to [rows, length], one decode loop, cut.

        The one generation path: `generate` and the pipeline's model step both call this, so
        padding, per-record random streams and the finishing rules cannot drift apart. Samples
        with one prompt (a record's `num_samples`) share one prefill, as do the padding rows.
        """
        ids, mask = left_pad([s.prompt_ids for s in samples], length, rows, self.eos_id)
        seeds = np.zeros((rows, 4), np.uint32)
        same_as = np.full(rows, len(samples))  # padding rows: all the first padding row's
        first: dict[tuple[int, ...], int] = {}
        for r, s in enumerate(samples):
            seeds[r] = record_seed(seed, s.key, s.sample_index)
            same_as[r] = first.setdefault(tuple(s.prompt_ids), r)
        out = self.decode(ids, mask, seeds, settings, same_as)
        results = []
        for r, s in enumerate(samples):
            top = (out["top_ids"][r], out["top_logprobs"][r]) if "top_ids" in out else None
            g = finish(out["tokens"][r], out["logprobs"][r], self.tokenizer, self.eos_id,
                       settings.stop, settings.stop_token_ids, top=top)
            if "prompt_logprobs" in out:  # the prompt's last len - 1 slots; its first has none
                scores = out["prompt_logprobs"][r, length - len(s.prompt_ids) + 1:]
                g.prompt_logprobs = [None, *(float(x) for x in scores)]
            results.append(g)
        return results

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
           stop: Sequence[str], stop_token_ids: Sequence[int] = (),
           top: tuple[np.ndarray, np.ndarray] | None = None) -> Generation:
    """Cut a decoded row at eos, a stop token id or the first stop string; set the finish reason.

    Eos and stop tokens are not part of the output. On a stop string the text ends before it
    and the tokens end with the one that completed it. `top` (ids, log-probs [N, K]) is cut to
    the same tokens.
    """
    tokens = [int(t) for t in tokens]
    ends = {eos_id, *stop_token_ids}
    n = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    reason = (FINISH_LENGTH if n == len(tokens)
              else FINISH_EOS if tokens[n] == eos_id else FINISH_STOP_TOKEN)
    tokens, logprobs = tokens[:n], [float(x) for x in logprobs[:n]]
    text = tokenizer.decode(tokens)
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if cuts:
        pos, _ = min(cuts)
        text = text[:pos]
        keep = next(k for k in range(1, len(tokens) + 1)
                    if any(s in tokenizer.decode(tokens[:k]) for s in stop if s))
        tokens, logprobs, reason = tokens[:keep], logprobs[:keep], FINISH_STOP
    out = Generation(tokens, text, logprobs, reason)
    if top is not None:
        out.top_token_ids = [[int(t) for t in row] for row in top[0][:len(tokens)]]
        out.top_logprobs = [[float(x) for x in row] for row in top[1][:len(tokens)]]
    return out
