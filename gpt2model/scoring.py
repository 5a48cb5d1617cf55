"""Per-token log-likelihoods: jitted batch scoring plus the host-side window planning around it.

A text of N tokens is scored as the sequence s = [<|endoftext|>] + tokens (the prepended token is
configurable), each target s[j] predicted from s[<j]. Texts longer than the model's context are
split into rolling windows; every target is scored exactly once, in the window that gives it the
most context the stride allows.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2model import aot
from gpt2model.batching import pack_windows, round_up
from gpt2model.config import GPT2Config
from gpt2model.model import (
    GPT2LMHeadModel,
    GPT2Model,
    compute_params,
    head_logits_by_vocab,
    lm_head_weights,
)


@dataclasses.dataclass(frozen=True)
class TokenWindow:
    """One model call's worth of a text's tokens (not a Beam window).

    input_ids: the window's tokens (length <= context); targets: the token each position predicts.
    score_start/score_end: the window positions whose prediction is scored.
    target_offset: index in the text's target list of the first scored prediction.
    """

    input_ids: tuple[int, ...]
    targets: tuple[int, ...]
    score_start: int
    score_end: int
    target_offset: int

    @property
    def num_scored(self) -> int:
        return self.score_end - self.score_start

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """The scored positions as (start, end) ranges (one for a window)."""
        return ((self.score_start, self.score_end),)


def plan_windows(sequence: Sequence[int], first_target: int, window: int, stride: int
                 ) -> list[TokenWindow]:
    """Split the scoring of sequence[first_target:] into model calls of at most `window` tokens.

    The first window scores up to `window` targets with whatever context precedes them (left-
    truncated to fit, as lm-evaluation-harness does); each later one scores `stride` new targets
    and fills the rest of the window with preceding tokens as context. stride == window gives
    lm-evaluation-harness's disjoint rolling windows; smaller strides give each target more
    context (the Hugging Face perplexity guide's sliding window).
    """
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    if first_target < 1:
        raise ValueError("the first token of a sequence has no context and cannot be a target")
    seq = tuple(int(t) for t in sequence)
    n = len(seq)
    out: list[TokenWindow] = []
    t0, step = first_target, window
    while t0 < n:
        t1 = min(t0 + step, n)
        a = max(0, t1 - 1 - window)
        out.append(TokenWindow(seq[a:t1 - 1], seq[a + 1:t1], t0 - 1 - a, t1 - 1 - a,
                          t0 - first_target))
        t0, step = t1, stride
    return out


def text_windows(token_ids: Sequence[int], *, window: int, stride: int | None = None,
                 bos_token_id: int | None) -> list[TokenWindow]:
    """Windows scoring every token of a text (all of them when a bos token is prepended).

    Without a prepended token the first text token has no context and is not scored.
    """
    seq = ([bos_token_id] if bos_token_id is not None else []) + list(token_ids)
    return plan_windows(seq, 1, window, stride or window)


def continuation_windows(context_ids: Sequence[int], continuation_ids: Sequence[int], *,
                         window: int, stride: int | None = None, eos_token_id: int
                         ) -> list[TokenWindow]:
    """Windows scoring a continuation given its context, as lm-evaluation-harness does.

    An empty context is replaced by <|endoftext|>; a context too long for the window is
    left-truncated.
    """
    context = list(context_ids) or [eos_token_id]
    return plan_windows(context + list(continuation_ids), len(context), window, stride or window)


def lm_eval_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                 eos_token_id: int) -> tuple[list[int], list[int], str]:
    """(context ids, continuation ids, continuation text scored) by lm-evaluation-harness's rules.

    As `TemplateLM._encode_pair` and `loglikelihood` of lm-eval 0.4: an empty context is
    <|endoftext|>; otherwise the context's trailing whitespace moves to the continuation, and the
    continuation's ids are enc(context + continuation)[len(enc(context)):], so a split inside a
    word or before a space scores the tokens the joint text really has. A context that is only
    whitespace becomes empty after the move and is then scored after <|endoftext|> (lm-eval would
    score it with no context at all, which leaves its first token without a prediction).
    """
    if context == "":
        return [eos_token_id], encode(continuation), continuation
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx or [eos_token_id], whole[len(ctx):], continuation


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """A shared context and several continuations of it, computed in one packed segment.

    Branch 0 is the context but its last token; branch k + 1 is that last token followed by
    choice k's tokens but its last, predicting choice k's tokens (`spans[k]`). Each branch sees
    the context and itself only (`GPT2Model(branch_ids=...)`), its positions continuing from the
    context's, so every choice scores exactly as context + choice alone would, while the context
    is computed once. `choices` are the indexes of the continuations held.
    """

    input_ids: tuple[int, ...]
    targets: tuple[int, ...]
    branches: tuple[int, ...]
    positions: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    choices: tuple[int, ...]

    @property
    def num_scored(self) -> int:
        return sum(end - start for start, end in self.spans)


def _tree(ctx: list[int], conts: list[tuple[int, list[int]]]) -> TokenTree:
    c = len(ctx)
    ids, tgt, branch, pos = list(ctx[:-1]), list(ctx[1:]), [0] * (c - 1), list(range(c - 1))
    spans = []
    for k, (_, cont) in enumerate(conts, start=1):
        spans.append((len(ids), len(ids) + len(cont)))
        ids += [ctx[-1], *cont[:-1]]
        tgt += cont
        branch += [k] * len(cont)
        pos += range(c - 1, c - 1 + len(cont))
    return TokenTree(tuple(ids), tuple(tgt), tuple(branch), tuple(pos), tuple(spans),
                     tuple(i for i, _ in conts))


def choice_parts(context_ids: Sequence[int], choices_ids: Sequence[Sequence[int]], *,
                 window: int, eos_token_id: int) -> list[TokenWindow | TokenTree]:
    """Model calls scoring every choice as a continuation of one context, choices in order.

    Consecutive choices that fit the window together with the context share a TokenTree (the
    context computed once); a choice whose context + choice exceeds the window is scored alone in
    `continuation_windows`, left-truncated as lm-evaluation-harness does, so each choice's
    score equals that of its own (context, choice) pair either way.
    """
    ctx = list(context_ids) or [eos_token_id]
    parts: list[TokenWindow | TokenTree] = []
    group: list[tuple[int, list[int]]] = []
    used = len(ctx) - 1  # the shared context's tokens in the tree
    for i, cont in enumerate(choices_ids):
        cont = list(cont)
        if not cont:
            raise ValueError(f"choice {i} has no tokens")
        if len(ctx) + len(cont) - 1 > window:  # needs truncation: its own windows
            if group:
                parts.append(_tree(ctx, group))
                group, used = [], len(ctx) - 1
            parts += continuation_windows(ctx, cont, window=window, eos_token_id=eos_token_id)
            continue
        if used + len(cont) > window:
            parts.append(_tree(ctx, group))
            group, used = [], len(ctx) - 1
        group.append((i, cont))
        used += len(cont)
    if group:
        parts.append(_tree(ctx, group))
    return parts


@dataclasses.dataclass
class TokenScores:
    """Scores of one text: log p(token | preceding tokens) in float32, and whether it was argmax."""

    token_ids: np.ndarray  # [N] int32
    logprobs: np.ndarray  # [N] float32; NaN for a token that was not scored
    greedy: np.ndarray  # [N] bool

    @property
    def sum_logprob(self) -> float:
        return float(np.nansum(self.logprobs, dtype=np.float64))

    @property
    def num_scored(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.logprobs)))

    @property
    def is_greedy(self) -> bool:
        return bool(np.all(self.greedy[~np.isnan(self.logprobs)]))


class Scorer:
    """A model bound to its params with a jitted scoring function.

    Compiles once per (batch, length) shape; `compile_count` says how many times it did, so
    callers (and tests) can check that bucketing keeps shapes fixed.
    """

    def __init__(self, config: GPT2Config, params: Any, dtype: Any = jnp.float32):
        self.config = config
        self.params = compute_params(params, dtype)
        self.model = GPT2LMHeadModel(config, dtype=dtype)
        # Programs: one per shape, also kept on disk beside JAX's cache when it is on
        # (gpt2model.aot), so a later process neither compiles nor traces the scorer.
        self._fn = aot.Programs(jax.jit(functools.partial(_score_batch, self.model),
                                        static_argnames=("top_logprobs", "entropy")),
                                tag=f"score_batch {self.model!r}")

    @property
    def compile_count(self) -> int:
        return len(self._fn)

    def __call__(self, input_ids, targets, segments, branches=None, positions=None, *,
                 scored=None, top_logprobs: int = 0, entropy: bool = False) -> tuple:
        """[B, T] arrays -> (logprobs [B, T] float32, greedy [B, T] bool); 0/False at pads.

        `segments` is an attention mask (1 = token, 0 = pad) or, for packed rows, segment ids
        (1..k for the k texts of a row, 0 = pad): texts of one row never see each other.
        `branches` and `positions` (packed TokenTrees) let continuations share their context.
        `scored` [B, T] (nonzero = wanted) names the positions whose prediction the caller
        reads, e.g. a rolling window's new targets but not its context; the LM head skips
        chunks with none (see `head_scores`), and other positions read 0/False. By default
        every non-pad position is scored.
        With `top_logprobs` K > 0 or `entropy`, a third element holds, from the same LM-head
        pass, "top_ids" [B, T, K] int32 and "top_logprobs" [B, T, K] float32 (best first) and
        "entropy" [B, T] float32 (nats, of the full next-token distribution).
        """
        if not 0 <= top_logprobs <= self.config.vocab_size:
            raise ValueError(f"top_logprobs must be in 0..{self.config.vocab_size}")
        out = self._fn(self.params, input_ids, targets, segments, branches, positions, scored,
                       top_logprobs=top_logprobs, entropy=entropy)
        return out if (top_logprobs or entropy) else out[:2]

    def _window(self, window: int | None) -> int:
        """The window length, the model's context by default; past it positions do not exist."""
        window = window or self.config.n_positions
        if not 0 < window <= self.config.n_positions:
            raise ValueError(f"window must be in 1..n_positions={self.config.n_positions}, "
                             f"got {window}")
        return window

    def score_windows(self, windows: Sequence[TokenWindow], length: int, batch_size: int
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Score windows in fixed [batch_size, length] batches (right-padded, padded rows).

        Returns (logprobs, greedy) of each window's scored positions, in order.
        """
        results = []
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            ids, tgt, mask = pack_windows(chunk, length, batch_size)
            wanted = np.zeros_like(mask)
            for row, w in enumerate(chunk):
                wanted[row, w.score_start:w.score_end] = 1
            lp, gr = jax.device_get(self(ids, tgt, mask, scored=wanted))
            for row, w in enumerate(chunk):
                results.append((lp[row, w.score_start:w.score_end],
                                gr[row, w.score_start:w.score_end]))
        return results

    def score_texts(self, texts_ids: Sequence[Sequence[int]], *, add_bos: bool = True,
                    window: int | None = None, stride: int | None = None, batch_size: int = 8
                    ) -> list[TokenScores]:
        """Score whole token lists of any length (rolling windows past the context)."""
        window = self._window(window)
        bos = self.config.bos_token_id if add_bos else None
        plans = [text_windows(t, window=window, stride=stride, bos_token_id=bos)
                 for t in texts_ids]
        flat = [w for p in plans for w in p]
        length = round_up(max((len(w.input_ids) for w in flat), default=1), 8, window)
        scored = iter(self.score_windows(flat, length, batch_size))
        out = []
        for ids, plan in zip(texts_ids, plans, strict=True):
            n = len(ids)
            lp = np.full(n, np.nan, np.float32)
            gr = np.zeros(n, bool)
            shift = 0 if add_bos else 1  # target k of the plan is text token k + shift
            for w in plan:
                wl, wg = next(scored)
                lo = w.target_offset + shift
                lp[lo:lo + w.num_scored] = wl
                gr[lo:lo + w.num_scored] = wg
            out.append(TokenScores(np.asarray(ids, np.int32), lp, gr))
        return out

    def score_continuations(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                            window: int | None = None, batch_size: int = 8
                            ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, every continuation token greedy) per (context, cont)."""
        window = self._window(window)
        plans = [continuation_windows(c, x, window=window, eos_token_id=self.config.eos_token_id)
                 for c, x in pairs]
        flat = [w for p in plans for w in p]
        length = round_up(max((len(w.input_ids) for w in flat), default=1), 8, window)
        scored = iter(self.score_windows(flat, length, batch_size))
        out = []
        for plan in plans:
            parts = [next(scored) for _ in plan]
            total = float(sum(np.sum(lp, dtype=np.float64) for lp, _ in parts))
            out.append((total, all(bool(np.all(g)) for _, g in parts)))
        return out


# Rows of logits computed at once. The full [B, T, V] float32 logits of an 8 x 512 batch are
# 820 MB written and read three times; 128-row chunks (26 MB) bound memory whatever the batch and
# stay nearer the cache (the chunk sizes tried are in BENCHMARKS.md, "Design measurements").
LOGIT_CHUNK_ROWS = 128


def _score_batch(model: GPT2LMHeadModel, params, input_ids, targets, segments, branches,
                 positions, scored=None, top_logprobs: int = 0, entropy: bool = False):
    h = GPT2Model(model.config, model.dtype, model.param_dtype).apply(
        {"params": params["transformer"]}, input_ids, segment_ids=segments,
        branch_ids=branches, position_ids=positions,
    )["last_hidden_state"]  # [B, T, E]
    wanted = segments if scored is None else scored
    return head_scores(model, params, h, targets, wanted, top_logprobs, entropy)


def head_scores(model: GPT2LMHeadModel, params, h, targets, wanted, top_logprobs: int = 0,
                entropy: bool = False):
    """Final hidden states [B, T, E] -> (log-probs of targets, greedy flags) [B, T], with the
    LM head and log-softmax run over LOGIT_CHUNK_ROWS rows at a time; with `top_logprobs` or
    `entropy` also a dict of those (see `Scorer.__call__`), from the same logits.

    Only positions where `wanted` [B, T] is nonzero are read (others are 0/False), and a chunk
    holding none of them skips the head: the head and its log-sum-exp are about a quarter of a
    GPT-2 scoring step, and padding rows, a row's padded end and a rolling window's context
    (up to all but one of its positions) need no prediction. Chunks are taken in row order, not
    compacted, so a batch sharded by rows keeps its sharding.
    """
    cfg = model.config
    b, t, e = h.shape
    n = b * t
    rows = min(LOGIT_CHUNK_ROWS, n)
    pad = -n % rows
    hs = jnp.pad(h.reshape(n, e), ((0, pad), (0, 0))).reshape(-1, rows, e)  # [N/C, C, E]
    ts = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, rows)  # [N/C, C]
    valid = wanted > 0
    need = jnp.pad(valid.reshape(n), (0, pad)).reshape(-1, rows)  # [N/C, C]
    head = lm_head_weights(params, cfg).astype(model.dtype)  # cast once, not per chunk

    def chunk(args):
        hc, tc, nc = args

        def compute():
            logits = head_logits_by_vocab(hc, head, model.dtype)  # [V, C]
            return _pick(logits, tc, top_logprobs, entropy)

        def skip():
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))

        return jax.lax.cond(jnp.any(nc), compute, skip)

    picked = jax.lax.map(chunk, (hs, ts, need))

    def unchunk(a, fill):  # [N/C, C, ...] -> [B, T, ...], `fill` where not wanted
        a = a.reshape(-1, *a.shape[2:])[:n].reshape(b, t, *a.shape[2:])
        return jnp.where(valid.reshape(b, t, *([1] * (a.ndim - 2))), a, fill)

    lp, gr = unchunk(picked["logprob"], 0.0), unchunk(picked["greedy"], False)
    extra = {name: unchunk(picked[name], 0) for name in ("top_ids", "top_logprobs", "entropy")
             if name in picked}
    return (lp, gr, extra) if extra else (lp, gr)


def _pick(logits: jax.Array, targets: jax.Array, top_logprobs: int = 0, entropy: bool = False
          ) -> dict[str, jax.Array]:
    """log_softmax(logits)[target] and whether target is the argmax, for vocab-major logits
    [V, C] and targets [C]; with `top_logprobs` the K best tokens and their log-probs, with
    `entropy` the distribution's.

    Greedy is "the target's logit is the maximum" (a tie for the top counts), read off the max
    the log-sum-exp needs anyway: `argmax`, a variadic (value, index) reduction, is far slower
    than a max on XLA's CPU backend and cost as much as the rest of this function
    (BENCHMARKS.md, "Design measurements"). Entropy is H = lse - sum(p * logit).
    """
    top = jnp.max(logits, axis=0)
    total = jnp.sum(jnp.exp(logits - top[None]), axis=0)
    lse = top + jnp.log(total)
    picked = jnp.take_along_axis(logits, targets[None], axis=0)[0]
    out = {"logprob": picked - lse, "greedy": picked >= top}
    if top_logprobs or entropy:
        # The extras read the logits behind a barrier so XLA fuses the log-sum-exp above as it
        # does without them: a row's log-probs are bit-identical with or without the extras.
        (out, top, total, lse), logits = jax.lax.optimization_barrier(
            ((out, top, total, lse), logits))
    if top_logprobs:
        values, ids = jax.lax.top_k(logits.T, top_logprobs)
        out["top_ids"] = ids.astype(jnp.int32)
        out["top_logprobs"] = values - lse[:, None]
    if entropy:
        shifted = jnp.exp(logits - top[None])
        out["entropy"] = lse - jnp.sum(shifted * logits, axis=0) / total
    return out
