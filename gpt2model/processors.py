"""Logits processors: one small pure function per generation control, and `apply`, which runs the
enabled ones inside the jitted decode loop.

`apply` follows the order transformers' `GenerationMixin._get_logits_processor` builds them in
(transformers/generation/utils.py): sequence bias (our `logit_bias`), repetition penalty,
no-repeat n-gram, bad words, min new tokens; then, when sampling only, the warpers temperature,
top-k, top-p, min-p. Presence and frequency penalties (vLLM/OpenAI; transformers has none) sit
right after the repetition penalty, where vLLM's `apply_penalties` puts them: after logit bias
and repetition penalty, before temperature.

Every control reads the `History` (prompt + generated ids of each row in one fixed buffer) and
is skipped at trace time when off, so a control that is off costs nothing. Adding a control is
one function here, one line in `apply` and one `SamplingConfig` field.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from gpt2model.config import SamplingConfig


def greedy_token(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` (the first index of the maximum, a NaN counting as the
    maximum), as int32, from two plain reductions: XLA's CPU backend runs argmax as a variadic
    (value, index) reduction, twice as slow over a decode step's [64, 50257] logits as a max
    and a min (BENCHMARKS.md, "Design measurements")."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


@struct.dataclass
class History:
    """The tokens each row has seen so far: the decode loop's state the processors read.

    ids: [B, P + N] int32, the left-padded prompt then the generated tokens (later slots filler).
    valid: [B, P + N] bool, True on real tokens so far: prompt padding and future slots are False,
      so they never count as context.
    step: [] int32, tokens generated so far (the same for every row; the next slot is P + step).
    """

    ids: jax.Array
    valid: jax.Array
    step: jax.Array
    prompt_length: int = struct.field(pytree_node=False)
    end_ids: tuple[int, ...] = struct.field(pytree_node=False)  # eos, then the stop token ids

    @classmethod
    def start(cls, prompt_ids: jax.Array, prompt_valid: jax.Array, max_new_tokens: int,
              end_ids: Sequence[int]) -> History:
        """A history holding only the left-padded prompts [B, P] (valid: their real tokens)."""
        b, p = prompt_ids.shape
        filler = jnp.full((b, max_new_tokens), end_ids[0], jnp.int32)
        return cls(ids=jnp.concatenate([prompt_ids.astype(jnp.int32), filler], axis=1),
                   valid=jnp.concatenate([prompt_valid.astype(bool),
                                          jnp.zeros((b, max_new_tokens), bool)], axis=1),
                   step=jnp.zeros((), jnp.int32), prompt_length=p,
                   end_ids=tuple(dict.fromkeys(int(t) for t in end_ids)))

    @property
    def end(self) -> jax.Array:
        """The next slot to write, [] int32."""
        return self.prompt_length + self.step

    def append(self, token: jax.Array, live: jax.Array) -> History:
        """Write the chosen tokens [B] at the next slot; real only in rows still live [B]."""
        return self.replace(ids=self.ids.at[:, self.end].set(token),
                            valid=self.valid.at[:, self.end].set(live), step=self.step + 1)

    def ends(self, token: jax.Array) -> jax.Array:
        """Whether each chosen token [B] ends its row (eos or a stop token id)."""
        return jnp.isin(token, jnp.asarray(self.end_ids, jnp.int32))

    def last(self, k: int) -> tuple[jax.Array, jax.Array]:
        """The last k tokens of each row [B, k], and whether all k are real tokens [B]."""
        start = self.end - k  # may be < 0; dynamic_slice would wrap it, so it is checked
        ids = jax.lax.dynamic_slice_in_dim(self.ids, start, k, axis=1)
        valid = jax.lax.dynamic_slice_in_dim(self.valid, start, k, axis=1)
        return ids, jnp.all(valid, axis=-1) & (start >= 0)

    @property
    def generated(self) -> tuple[jax.Array, jax.Array]:
        """The generated part only: ids and valid, [B, N] each."""
        p = self.prompt_length
        return self.ids[:, p:], self.valid[:, p:]


def token_counts(ids: jax.Array, weight: jax.Array, vocab: int) -> jax.Array:
    """How often each vocabulary id occurs in ids [B, T] where weight [B, T] is true -> [B, V]."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, ids].add(weight.astype(jnp.int32))


# ------------------------------------------------------------------------------ processors


def logit_bias(logits: jax.Array, pairs: Sequence[tuple[int, float]]) -> jax.Array:
    """Add each (token id, bias) to the logits [B, V]: transformers' SequenceBiasLogitsProcessor
    with single-token sequences (OpenAI's `logit_bias`)."""
    ids = jnp.asarray([t for t, _ in pairs], jnp.int32)
    return logits.at[:, ids].add(jnp.asarray([b for _, b in pairs], jnp.float32))


def repetition_penalty(logits: jax.Array, history: History, penalty: float) -> jax.Array:
    """Every token of prompt + output so far: negative logits times penalty, others divided by
    it (transformers' RepetitionPenaltyLogitsProcessor, prompt padding ignored as `generate`
    does)."""
    seen = token_counts(history.ids, history.valid, logits.shape[-1]) > 0
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def presence_frequency_penalty(logits: jax.Array, history: History, presence: float,
                               frequency: float) -> jax.Array:
    """logits[t] -= frequency * count(t) + presence * (count(t) > 0), counting generated tokens
    only, not the prompt (vLLM's and OpenAI's definition, in vLLM's order: frequency first)."""
    counts = token_counts(*history.generated, logits.shape[-1])
    if frequency:
        logits = logits - frequency * counts
    if presence:
        logits = logits - presence * (counts > 0)
    return logits


def no_repeat_ngram(logits: jax.Array, history: History, n: int) -> jax.Array:
    """Ban every token that would complete an n-gram already in prompt + output
    (transformers' NoRepeatNGramLogitsProcessor)."""
    ids, valid = history.ids, history.valid
    windows = ids.shape[1] - n + 1  # n-gram starts in the buffer
    if windows <= 0:
        return logits
    # A window counts when all its n tokens are real; real tokens are contiguous in a row.
    match = valid[:, :windows] & valid[:, n - 1:]  # [B, W]
    if n > 1:
        suffix, ok = history.last(n - 1)  # [B, n - 1]: the prefix the next token would extend
        match &= ok[:, None]
        for j in range(n - 1):
            match &= ids[:, j:j + windows] == suffix[:, j:j + 1]
    banned = token_counts(ids[:, n - 1:], match, logits.shape[-1]) > 0
    return jnp.where(banned, -jnp.inf, logits)


def bad_words(logits: jax.Array, history: History, words: Sequence[Sequence[int]]) -> jax.Array:
    """Ban the last token of each bad word whose other tokens end the context (transformers'
    NoBadWordsLogitsProcessor: one-token words are always banned, except an end id itself)."""
    by_prefix: dict[int, list[Sequence[int]]] = defaultdict(list)
    for word in words:
        if not (len(word) == 1 and word[0] in history.end_ids):  # transformers drops these
            by_prefix[len(word) - 1].append(word)
    if by_prefix.get(0):
        logits = logits.at[:, jnp.asarray([w[0] for w in by_prefix.pop(0)])].set(-jnp.inf)
    for k, group in by_prefix.items():  # all words of one prefix length in one comparison
        prefixes = jnp.asarray([w[:-1] for w in group], jnp.int32)  # [K, k]
        context, ok = history.last(k)  # [B, k]
        match = ok[:, None] & jnp.all(context[:, None, :] == prefixes[None], axis=-1)  # [B, K]
        last = jnp.asarray([w[-1] for w in group], jnp.int32)
        banned = jnp.zeros(logits.shape, jnp.int32).at[:, last].add(match.astype(jnp.int32))
        logits = jnp.where(banned > 0, -jnp.inf, logits)
    return logits


def min_new_tokens(logits: jax.Array, history: History, minimum: int) -> jax.Array:
    """Suppress eos and the stop token ids until `minimum` tokens are generated (transformers'
    MinNewTokensLengthLogitsProcessor, with the stop ids among its eos ids)."""
    ends = jnp.asarray(history.end_ids, jnp.int32)
    return jnp.where(history.step < minimum, logits.at[:, ends].set(-jnp.inf), logits)


# -------------------------------------------------------------------------------- warpers


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
    """The sampling warpers on [B, V] float32 logits, in transformers' order: temperature,
    top-k, top-p, min-p (removed entries = -inf).

    Top-k keeps the logits >= the k-th largest (ties kept, as Hugging Face does); top-p keeps
    the nucleus {p >= tau} for the largest tau whose probability mass is >= top_p. Both
    thresholds come from bisection rather than sorting the vocabulary every step. Min-p drops
    tokens less likely than min_p times the most likely one (MinPLogitsWarper).
    """
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        k = settings.top_k
        # The bracket starts at the smallest finite logit: processors may have set some to -inf.
        lowest = jnp.min(jnp.where(jnp.isfinite(logits), logits, jnp.inf), axis=-1)
        kth = _bisect_threshold(logits, lambda keep: jnp.sum(keep, axis=-1) >= k,
                                lowest, jnp.max(logits, axis=-1))
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        p = settings.top_p
        tau = _bisect_threshold(
            probs, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= p,
            jnp.zeros(probs.shape[0]), jnp.max(probs, axis=-1))
        logits = jnp.where(probs >= tau, logits, -jnp.inf)
    if settings.min_p:
        logits = min_p(logits, settings.min_p)
    return logits


def min_p(logits: jax.Array, fraction: float) -> jax.Array:
    """Drop tokens with probability < fraction * the top probability (MinPLogitsWarper; the top
    token always stays, since fraction <= 1)."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < fraction * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


# ---------------------------------------------------------------------------------- apply


def check_token_ids(settings: SamplingConfig, vocab: int) -> None:
    """Refuse token ids the model's vocabulary does not have (known only once logits exist)."""
    ids = {*settings.stop_token_ids, *(t for t, _ in settings.logit_bias),
           *(t for word in settings.bad_words_ids for t in word)}
    if ids and max(ids) >= vocab:
        raise ValueError(f"token ids {sorted(t for t in ids if t >= vocab)} in the sampling "
                         f"settings are outside the model's vocabulary of {vocab}")


def apply(logits: jax.Array, history: History, settings: SamplingConfig) -> jax.Array:
    """The enabled controls on next-token logits [B, V] float32, in the reference order (see the
    module docstring); warpers only when sampling, as transformers skips them when greedy."""
    check_token_ids(settings, logits.shape[-1])
    if settings.logit_bias:
        logits = logit_bias(logits, settings.logit_bias)
    if settings.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, history, settings.repetition_penalty)
    if settings.presence_penalty or settings.frequency_penalty:
        logits = presence_frequency_penalty(logits, history, settings.presence_penalty,
                                            settings.frequency_penalty)
    if settings.no_repeat_ngram_size:
        logits = no_repeat_ngram(logits, history, settings.no_repeat_ngram_size)
    if settings.bad_words_ids:
        logits = bad_words(logits, history, settings.bad_words_ids)
    if settings.min_new_tokens:
        logits = min_new_tokens(logits, history, settings.min_new_tokens)
    if not settings.greedy:
        logits = filter_logits(logits, settings)
    return logits
