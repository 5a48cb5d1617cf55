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

from gpt2model.scoring import TokenWindow, continuation_windows, lm_eval_pair, text_windows
from pipeline.records import EMPTY, ERRORS, Record, RecordInfo, error_row, with_kept_fields

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
TOP_FIELDS = [pa.field("top_token_ids", pa.list_(pa.list_(pa.int32()))),
              pa.field("top_logprobs", pa.list_(pa.list_(pa.float32())))]
ENTROPY_FIELDS = [pa.field("entropy", pa.list_(pa.float32()))]
# The per-token list columns, which --summary-only drops.
PER_TOKEN = {"token_ids", "token_logprobs", "greedy", "top_token_ids", "top_logprobs", "entropy"}


def schema(config: Any, keep_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a score job's output (documented in the README)."""
    fields = (FIELDS + (CONDITIONAL_FIELDS if config.context_field else [])
              + (TOP_FIELDS if config.top_logprobs else [])
              + (ENTROPY_FIELDS if config.entropy else []))
    if config.summary_only:
        fields = [f for f in fields if f.name not in PER_TOKEN]
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
    # Per scored token, when the job asks: "top_ids" [n, K], "top_logprobs" [n, K], "entropy" [n]
    extra: dict[str, np.ndarray] | None = None
    error: str | None = None  # the model call failed for this item (see handler.ScoreBatches)


def make_items(rec: Record, config: Any, tokenizer: Any, context: int,
               meta_type: type[ScoreMeta] = ScoreMeta, **meta_fields: Any):
    """A record -> its ScoreItems, or a tagged error / empty output.

    `meta_type` and `meta_fields`: a mode that scores like this one but builds other rows
    (filter) carries its own record info.

    With a context, the pair is tokenized as lm-evaluation-harness does (`lm_eval_pair`): the
    context's trailing whitespace joins the continuation, whose ids come from the joint text;
    `num_bytes` (for bits per byte) is then that continuation's size.
    """
    text, ctx_ids = rec.text, None
    if rec.context is not None:
        ctx_ids, ids, text = lm_eval_pair(tokenizer.encode, rec.context, rec.text,
                                          tokenizer.eos_token_id)
    else:
        ids = tokenizer.encode(rec.text)
    meta = meta_type.of(rec, token_ids=tuple(ids), num_bytes=len(text.encode("utf-8", "replace")),
                        conditional=ctx_ids is not None, **meta_fields)
    if not ids:
        if ctx_ids is not None and rec.text:
            yield beam.pvalue.TaggedOutput(ERRORS, rec.error(
                "the continuation has no tokens of its own: it merges into the context's last "
                "token when the two are tokenized together (lm-eval scores such a pair as 0.0)"))
            return
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
    extra = None
    if parts[0].extra is not None:
        extra = {k: np.concatenate([p.extra[k] for p in parts]) for k in parts[0].extra}
    return PartScores(key, 0, 1, 0, np.concatenate([p.logprobs for p in parts]),
                      np.concatenate([p.greedy for p in parts]), parts[0].meta, extra)


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

    def setup(self) -> None:
        from pipeline.metrics import ERRORS as ERRORS_METRIC
        from pipeline.metrics import counter

        self.errors = counter(ERRORS_METRIC)

    def process(self, result: PartScores):
        if result.parts == 1:
            yield self._failed([result]) or result
            return
        parts = self.pending.setdefault(result.key, [])
        parts.append(result)
        if len(parts) == result.parts:
            del self.pending[result.key]
            yield self._failed(parts) or merge_parts((result.key, parts))

    def _failed(self, parts: list[PartScores]):
        """The error row of a record one of whose parts failed in the model step, else None."""
        failed = next((p for p in parts if p.error), None)
        if failed is None:
            return None
        meta = next(p.meta for p in parts if p.meta is not None)
        self.errors.inc()
        reason = failed.error if len(parts) == 1 else (
            f"window {failed.part} of {failed.parts}: {failed.error}")
        return beam.pvalue.TaggedOutput(ERRORS, error_row(meta.source, meta.index, meta.id,
                                                          reason, None))

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
    unscored = len(ids) - len(lp)  # 1 without a prepended bos: the first token has no context
    if unscored:
        lp = np.concatenate([np.full(unscored, np.nan, np.float32), lp])
    greedy = result.greedy
    if len(greedy) < len(lp):
        greedy = np.concatenate([np.zeros(len(lp) - len(greedy), bool), greedy])
    out = _stats_row(meta, ids, lp, greedy)
    if result.extra is not None and not config.summary_only:
        out.update(_per_token_extras(result.extra, unscored))
    return _finish(out, meta, config)


def _per_token_extras(extra: dict[str, np.ndarray], unscored: int) -> dict[str, Any]:
    """Top-K and entropy columns; an unscored position has null entries."""
    out: dict[str, Any] = {}
    if "top_ids" in extra:
        out["top_token_ids"] = [None] * unscored + extra["top_ids"].tolist()
        out["top_logprobs"] = [None] * unscored + extra["top_logprobs"].astype(
            np.float32).tolist()
    if "entropy" in extra:
        out["entropy"] = [None] * unscored + [float(x) for x in extra["entropy"]]
    return out


def _finish(out: dict[str, Any], meta: ScoreMeta, config: Any) -> dict[str, Any]:
    """Drop the per-token columns for --summary-only; kept input fields go last."""
    if config.summary_only:
        for name in PER_TOKEN:
            out.pop(name, None)
    out.update(meta.keep)
    return out


def empty_row(meta: ScoreMeta, config: Any) -> dict[str, Any]:
    """Row of an empty text (with --allow-empty): no tokens, null statistics."""
    ids = list(meta.token_ids)
    lp = np.full(len(ids), np.nan, np.float32)
    out = _stats_row(meta, ids, lp, np.zeros(len(ids), bool))
    if config.top_logprobs:
        out.update(top_token_ids=[None] * len(ids), top_logprobs=[None] * len(ids))
    if config.entropy:
        out["entropy"] = [None] * len(ids)
    return _finish(out, meta, config)


def doc_stats(lp: np.ndarray, num_bytes: int) -> dict[str, Any]:
    """Document-level numbers of float32 log-probs (NaN = unscored): num_tokens, sum_logprob,
    mean_logprob, perplexity, bits_per_byte (None where undefined). Summed in float64."""
    scored = ~np.isnan(lp)
    n = int(scored.sum())
    total = float(np.sum(lp[scored], dtype=np.float64))
    mean = total / n if n else None
    return {"num_tokens": n, "sum_logprob": total, "mean_logprob": mean,
            "perplexity": math.exp(-mean) if mean is not None else None,
            "bits_per_byte": -total / (math.log(2) * num_bytes) if n and num_bytes else None}


def _stats_row(meta: ScoreMeta, ids: list[int], lp: np.ndarray, greedy: np.ndarray
               ) -> dict[str, Any]:
    scored = ~np.isnan(lp)
    stats = doc_stats(lp, meta.num_bytes)
    out = {
        "id": meta.id,
        "num_tokens": stats["num_tokens"],
        "token_ids": ids,
        "token_logprobs": [None if math.isnan(x) else float(x) for x in lp],
        "sum_logprob": stats["sum_logprob"],
        "mean_logprob": stats["mean_logprob"],
        "perplexity": stats["perplexity"],
        "bits_per_byte": stats["bits_per_byte"],
        "greedy": [bool(g) for g in greedy],
    }
    if meta.conditional:
        out["is_greedy"] = bool(np.all(greedy[scored]))
    return out


def tokens(row: dict[str, Any], config: Any) -> int:
    """The tokens a row scored (what the `tokens` metric counted for it)."""
    return row["num_tokens"] or 0
