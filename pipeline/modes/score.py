"""Score mode: per-token log-likelihoods of every text, or of a continuation given a context.

A record becomes one `ScoreItem` per token window (rolling windows past the context); the model
step returns `PartScores` per item; a long record's parts are joined (`JoinParts`) and `row`
builds the output row of the schema `FIELDS` (+ `is_greedy` with a context, + kept fields).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from gpt2model.scoring import TokenWindow, continuation_windows, text_windows
from pipeline.records import EMPTY, ERRORS, Record, RecordInfo, with_kept_fields

FIELDS = [
    pa.field("id", pa.string()),
    pa.field("num_tokens", pa.int32()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("sum_logprob", pa.float64()),
    pa.field("mean_logprob", pa.float64()),
    pa.field("perplexity", pa.float64()),
    pa.field("bits_per_byte", pa.float64()),
    pa.field("greedy", pa.list_(pa.bool_())),
]
CONDITIONAL_FIELDS = [pa.field("is_greedy", pa.bool_())]


def schema(config: Any, keep_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a score job's output (documented in the README)."""
    fields = FIELDS + (CONDITIONAL_FIELDS if config.context_field else [])
    return with_kept_fields(fields, config.keep_fields, keep_types)


@dataclasses.dataclass(frozen=True)
class ScoreMeta(RecordInfo):
    """A scored record's info for its row: its token ids, UTF-8 size, whether conditional."""

    token_ids: tuple[int, ...] = ()
    num_bytes: int = 0
    conditional: bool = False


@dataclasses.dataclass(frozen=True)
class ScoreItem:
    """One token window of one record; `meta` rides on part 0 only."""

    key: str
    part: int
    parts: int
    window: TokenWindow
    meta: ScoreMeta | None

    @property
    def length(self) -> int:
        return len(self.window.input_ids)


@dataclasses.dataclass(frozen=True)
class PartScores:
    """The model step's result for one ScoreItem: log-probs and greedy flags of its targets."""

    key: str
    part: int
    parts: int
    target_offset: int
    logprobs: np.ndarray
    greedy: np.ndarray
    meta: ScoreMeta | None


def make_items(rec: Record, ids: list[int], ctx_ids: list[int] | None, config: Any,
               tokenizer: Any, context: int):
    """A tokenized record -> its ScoreItems, or a tagged error / empty output."""
    meta = ScoreMeta.of(rec, token_ids=tuple(ids),
                        num_bytes=len(rec.text.encode("utf-8", "replace")),
                        conditional=ctx_ids is not None)
    if not ids:
        if not config.allow_empty:
            yield beam.pvalue.TaggedOutput(ERRORS, rec.error("text has no tokens to score"))
            return
        yield beam.pvalue.TaggedOutput(EMPTY, meta)
        return
    if ctx_ids is not None:
        windows = continuation_windows(ctx_ids, ids, window=context, stride=config.stride,
                                       eos_token_id=tokenizer.eos_token_id)
    else:
        bos = tokenizer.eos_token_id if config.add_bos else None
        windows = text_windows(ids, window=context, stride=config.stride, bos_token_id=bos)
        if not windows:  # a single token without a prepended bos has nothing to predict
            if config.allow_empty:
                yield beam.pvalue.TaggedOutput(EMPTY, meta)
                return
            yield beam.pvalue.TaggedOutput(ERRORS, rec.error(
                "text has a single token and --no-add-bos leaves nothing to score"))
            return
    for part, w in enumerate(windows):
        yield ScoreItem(rec.key, part, len(windows), w, meta if part == 0 else None)


def merge_parts(key_parts: tuple[str, list[PartScores]]) -> PartScores:
    """Join a long record's parts back into one result (targets are disjoint by construction)."""
    key, parts = key_parts
    parts = sorted(parts, key=lambda p: p.part)
    if len(parts) != parts[0].parts or [p.part for p in parts] != list(range(len(parts))):
        raise RuntimeError(f"record {key}: got windows {[p.part for p in parts]} of "
                           f"{parts[0].parts}")
    return PartScores(key, 0, 1, 0, np.concatenate([p.logprobs for p in parts]),
                      np.concatenate([p.greedy for p in parts]), parts[0].meta)


class JoinParts(beam.DoFn):
    """PartScores -> one per record: a long record's parts joined once all are in.

    Why not a GroupByKey on the record: it ends the fused stage, and the Flatten joining its
    output with the single-window records makes the DirectRunner hold every scored record of the
    corpus in memory until all are scored. No shuffle is needed: all parts of a record come from
    one Tokenize call and go down one fused chain of ParDos (batching flushes in finish_bundle),
    so they all arrive in the bundle that tokenized the record.
    """

    def start_bundle(self) -> None:
        self.pending: dict[str, list[PartScores]] = {}

    def process(self, result: PartScores):
        if result.parts == 1:
            yield result
            return
        parts = self.pending.setdefault(result.key, [])
        parts.append(result)
        if len(parts) == result.parts:
            del self.pending[result.key]
            yield merge_parts((result.key, parts))

    def finish_bundle(self) -> None:
        if self.pending:
            key, parts = next(iter(self.pending.items()))
            raise RuntimeError(f"record {key}: windows {sorted(p.part for p in parts)} of "
                               f"{parts[0].parts} reached the end of a bundle without the rest "
                               "(the runner did not fuse tokenize -> score -> join)")


def row(result: PartScores, config: Any) -> dict[str, Any]:
    """The output row of a scored record."""
    meta = result.meta
    lp = result.logprobs.astype(np.float32)
    ids = list(meta.token_ids)
    if not meta.conditional and not config.add_bos and ids:
        lp = np.concatenate([np.array([np.nan], np.float32), lp])  # the first token is unscored
    greedy = result.greedy
    if len(greedy) < len(lp):
        greedy = np.concatenate([np.zeros(len(lp) - len(greedy), bool), greedy])
    return _stats_row(meta, ids, lp, greedy)


def empty_row(meta: ScoreMeta, config: Any) -> dict[str, Any]:
    """Row of an empty text (with --allow-empty): no tokens, null statistics."""
    ids = list(meta.token_ids)
    lp = np.full(len(ids), np.nan, np.float32)
    return _stats_row(meta, ids, lp, np.zeros(len(ids), bool))


def _stats_row(meta: ScoreMeta, ids: list[int], lp: np.ndarray, greedy: np.ndarray
               ) -> dict[str, Any]:
    scored = ~np.isnan(lp)
    n = int(scored.sum())
    total = float(np.sum(lp[scored], dtype=np.float64))
    mean = total / n if n else None
    out = {
        "id": meta.id,
        "num_tokens": n,
        "token_ids": ids,
        "token_logprobs": [None if math.isnan(x) else float(x) for x in lp],
        "sum_logprob": total,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if mean is not None else None,
        "bits_per_byte": (-total / (math.log(2) * meta.num_bytes)
                          if n and meta.num_bytes else None),
        "greedy": [bool(g) for g in greedy],
    }
    if meta.conditional:
        out["is_greedy"] = bool(np.all(greedy[scored]))
    out.update(meta.keep)
    return out
