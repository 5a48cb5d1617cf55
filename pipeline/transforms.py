"""Record-level steps: parse/validate, tokenize into work items, bucket+batch, assemble, format.

Every step that can reject a record sends it to the tagged output `errors` with its source,
line/row, id and reason; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from gpt2model.scoring import Window, continuation_windows, step_rows, text_windows
from pipeline.config import JobConfig, default_buckets
from pipeline.io import SourceRecord

NAMESPACE = "gpt2pipeline"
ERRORS = "errors"
EMPTY = "empty"
RAW_LIMIT = 1000


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


def clean_str(s: str) -> str:
    """Replace lone surrogates (valid in a Python str, not in UTF-8) so writers never fail."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def clean_value(value: Any) -> Any:
    """`clean_str` applied to every string inside a kept value (list items, dict keys/values).

    A JSON input can hold lone surrogates (escaped as "\\ud800") anywhere in a value; one left
    inside a list or object would make Beam's coder and the writers fail and stop the job.
    """
    if isinstance(value, str):
        return clean_str(value)
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    if isinstance(value, dict):
        return {clean_value(k): clean_value(v) for k, v in value.items()}
    return value


def error_row(source: str, index: int, record_id: str | None, reason: str, raw: Any) -> dict:
    """The errors output's row: where the record came from, why it failed, what it held."""
    raw_text = raw if isinstance(raw, str) or raw is None else repr(raw)
    if raw_text is not None:
        raw_text = clean_str(raw_text[:RAW_LIMIT])
    return {"source": source, "line": index, "id": record_id, "reason": reason, "raw": raw_text}


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated input record; `key` is unique per input row (source:index), `id` is theirs."""

    key: str
    id: str
    text: str
    context: str | None
    keep: dict[str, Any]
    source: str
    index: int


def default_id(source: str, index: int) -> str:
    """Stable id from the file name and line/row number, so reruns give the same ids."""
    return f"{os.path.basename(source)}:{index}"


class ParseRecords(beam.DoFn):
    """SourceRecord -> Record, or an error row naming the field and the problem."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.errors = counter("errors")

    def process(self, rec: SourceRecord):
        cfg = self.config
        raw = rec.raw
        record_id = None
        if rec.error is not None:
            yield self._error(rec, None, rec.error)
            return
        value = rec.value
        if not isinstance(value, dict):
            yield self._error(rec, None, f"record is a {type(value).__name__}, not an object")
            return
        if cfg.id_field:
            record_id = value.get(cfg.id_field)
            if record_id is None:
                yield self._error(rec, None, f"missing or null id field {cfg.id_field!r}")
                return
            if isinstance(record_id, bool) or not isinstance(record_id, str | int):
                yield self._error(rec, None, f"id field {cfg.id_field!r} is a "
                                  f"{type(record_id).__name__}, expected a string or integer")
                return
            record_id = clean_str(str(record_id))
        else:
            record_id = default_id(rec.source, rec.index)
        fields = [cfg.source_field] + ([cfg.context_field] if cfg.context_field else [])
        texts = []
        for name in fields:
            v = value.get(name)
            if v is None:
                reason = "missing field" if name not in value else "null field"
                yield self._error(rec, record_id, f"{reason} {name!r}", raw)
                return
            if not isinstance(v, str):
                yield self._error(rec, record_id, f"field {name!r} is a {type(v).__name__}, "
                                  "expected a string", raw)
                return
            texts.append(v)
        text = texts[0]
        if not text and not (cfg.mode == "score" and cfg.allow_empty):
            what = "prompt" if cfg.mode == "generate" else "text"
            yield self._error(rec, record_id, f"empty {what} in field {cfg.source_field!r}", raw)
            return
        keep = {k: clean_value(value.get(k)) for k in cfg.keep_fields}
        yield Record(f"{rec.source}:{rec.index}", record_id, text,
                     texts[1] if len(texts) > 1 else None, keep, rec.source, rec.index)

    def _error(self, rec: SourceRecord, record_id, reason, raw=None):
        self.errors.inc()
        return beam.pvalue.TaggedOutput(
            ERRORS, error_row(rec.source, rec.index, record_id, reason, raw or rec.raw))


@dataclasses.dataclass(frozen=True)
class ScoreItem:
    """One window of one record; `meta` (token ids, output fields) rides on part 0 only."""

    key: str
    part: int
    parts: int
    window: Window
    meta: dict[str, Any] | None

    @property
    def length(self) -> int:
        return len(self.window.input_ids)


@dataclasses.dataclass(frozen=True)
class GenerateItem:
    """One sample of one prompt."""

    key: str
    sample_index: int
    prompt_ids: tuple[int, ...]
    meta: dict[str, Any]

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


class Tokenize(beam.DoFn):
    """Record -> work items. The tokenizer and context size load once per worker (setup)."""

    def __init__(self, config: JobConfig):
        self.config = config

    def setup(self) -> None:
        from gpt2model import GPT2Config, get_tokenizer

        self.tokenizer = get_tokenizer(self.config.model)
        self.context = GPT2Config.from_pretrained(self.config.model).n_positions
        self.errors = counter("errors")

    def process(self, rec: Record):
        try:
            ids = self.tokenizer.encode(rec.text)
            ctx_ids = self.tokenizer.encode(rec.context) if rec.context is not None else None
        except ValueError as err:
            self.errors.inc()
            yield beam.pvalue.TaggedOutput(
                ERRORS, error_row(rec.source, rec.index, rec.id, str(err), rec.text))
            return
        if self.config.mode == "generate":
            yield from self._generate_items(rec, ids)
        else:
            yield from self._score_items(rec, ids, ctx_ids)

    def _meta(self, rec: Record, **extra) -> dict[str, Any]:
        return {"id": rec.id, "keep": rec.keep, "source": rec.source, "index": rec.index, **extra}

    def _score_items(self, rec: Record, ids: list[int], ctx_ids: list[int] | None):
        cfg = self.config
        meta = self._meta(rec, token_ids=ids, num_bytes=len(rec.text.encode("utf-8", "replace")),
                          conditional=ctx_ids is not None)
        if not ids:
            if not cfg.allow_empty:
                self.errors.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    rec.source, rec.index, rec.id, "text has no tokens to score", rec.text))
                return
            yield beam.pvalue.TaggedOutput(EMPTY, meta)
            return
        if ctx_ids is not None:
            windows = continuation_windows(ctx_ids, ids, window=self.context, stride=cfg.stride,
                                           eos_token_id=self.tokenizer.eos_token_id)
        else:
            bos = self.tokenizer.eos_token_id if cfg.add_bos else None
            windows = text_windows(ids, window=self.context, stride=cfg.stride, bos_token_id=bos)
            if not windows:  # a single token without a prepended bos has nothing to predict
                if cfg.allow_empty:
                    yield beam.pvalue.TaggedOutput(EMPTY, meta)
                    return
                self.errors.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    rec.source, rec.index, rec.id,
                    "text has a single token and --no-add-bos leaves nothing to score", rec.text))
                return
        for part, w in enumerate(windows):
            yield ScoreItem(rec.key, part, len(windows), w, meta if part == 0 else None)

    def _generate_items(self, rec: Record, ids: list[int]):
        cfg = self.config
        room = self.context - cfg.max_new_tokens
        if len(ids) > room:
            self.errors.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                rec.source, rec.index, rec.id,
                f"prompt of {len(ids)} tokens leaves no room for max_new_tokens="
                f"{cfg.max_new_tokens} in the model's context of {self.context}", rec.text))
            return
        meta = self._meta(rec, prompt=clean_str(rec.text))
        for s in range(cfg.num_samples):
            yield GenerateItem(rec.key, s, tuple(ids), meta)


def bucket_lengths(config: JobConfig, context: int, extra: int = 0) -> tuple[int, ...]:
    """The padded lengths work items are bucketed into; the last one is always what fits."""
    top = context - extra
    buckets = [b for b in (config.bucket_boundaries or default_buckets(context)) if b < top]
    return (*buckets, top)


def rows_for(length: int, config: JobConfig, extra: int = 0) -> int:
    """Rows per batch of a bucket from the token budget (at least one)."""
    return max(1, config.max_tokens_per_batch // (length + extra))


def padded_rows(used: int, length: int, config: JobConfig, extra: int = 0) -> int:
    """Rows a batch of `used` rows is padded to: the next multiple of 1/tail_steps of the full
    row count. A bundle's last batch is usually part-filled; padding it to the full count cost
    up to a whole batch of compute (padding efficiency 0.85 on a 60-document corpus), while
    each extra row count is one more compile per length, so the steps stay few."""
    return step_rows(used, rows_for(length, config, extra), config.tail_steps)


class BucketBatch(beam.DoFn):
    """Group work items by padded length and emit (length, items) batches of a fixed row count.

    Why not Beam's BatchElements: its batch size is an element count tuned adaptively from
    timings (every new size is a recompile), and its length buckets only exist in its stateful
    mode, which shuffles on (worker, bucket). Here each bucket's row count comes from the token
    budget, so each bucket has one padded shape and compiles once. Batching is per bundle, with no
    GroupByKey, so parallelism is not capped by the number of buckets.
    """

    def __init__(self, config: JobConfig, context: int, extra: int = 0):
        self.buckets = bucket_lengths(config, context, extra)
        self.config = config
        self.extra = extra

    def start_bundle(self) -> None:
        self.pending: dict[int, list] = defaultdict(list)

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"work item of {length} tokens exceeds the largest bucket "
                         f"{self.buckets[-1]}")

    def process(self, item):
        b = self.bucket(item.length)
        self.pending[b].append(item)
        if len(self.pending[b]) >= rows_for(b, self.config, self.extra):
            yield b, self.pending.pop(b)

    def finish_bundle(self):
        for b, items in self.pending.items():
            yield WindowedValue((b, items), GlobalWindow().max_timestamp(), [GlobalWindow()])
        self.pending = defaultdict(list)


class PackBatch(beam.DoFn):
    """Pack score items several to a row: (context, rows of items) batches of one shape.

    Short texts share a row (each attends only to itself), so padding stays low with a single
    compiled shape per worker; see gpt2model.scoring.RowPacker. Per bundle, like BucketBatch.
    """

    def __init__(self, config: JobConfig, context: int):
        self.length = context
        self.rows = rows_for(context, config)

    def start_bundle(self) -> None:
        from gpt2model.scoring import RowPacker

        self.packer = RowPacker(self.length, self.rows)

    def process(self, item):
        for rows in self.packer.add(item, item.length):
            yield self.length, rows

    def finish_bundle(self):
        for rows in self.packer.flush():
            yield WindowedValue((self.length, rows), GlobalWindow().max_timestamp(),
                                [GlobalWindow()])


def one_per_row(batch: tuple[int, list]) -> tuple[int, list[list]]:
    """A bucketed batch as rows of one item each (the model step's input form)."""
    length, items = batch
    return length, [[it] for it in items]


@dataclasses.dataclass(frozen=True)
class WindowScores:
    key: str
    part: int
    parts: int
    target_offset: int
    logprobs: np.ndarray
    greedy: np.ndarray
    meta: dict[str, Any] | None


def merge_parts(key_parts: tuple[str, list[WindowScores]]) -> WindowScores:
    """Sum a long record's windows back into one result (targets are disjoint by construction)."""
    key, parts = key_parts
    parts = sorted(parts, key=lambda p: p.part)
    if len(parts) != parts[0].parts or [p.part for p in parts] != list(range(len(parts))):
        raise RuntimeError(f"record {key}: got windows {[p.part for p in parts]} of "
                           f"{parts[0].parts}")
    return WindowScores(key, 0, 1, 0, np.concatenate([p.logprobs for p in parts]),
                        np.concatenate([p.greedy for p in parts]), parts[0].meta)


class MergeWindows(beam.DoFn):
    """WindowScores -> one per record: a long record's windows merged once all are in.

    Why not a GroupByKey on the record: it ends the fused stage, and the Flatten joining its
    output with the single-window records makes the DirectRunner hold every scored record of the
    corpus in memory until all are scored. No shuffle is needed: all windows of a record come
    from one Tokenize call and go down one fused chain of ParDos (batching flushes in
    finish_bundle), so they all arrive in the bundle that tokenized the record.
    """

    def start_bundle(self) -> None:
        self.pending: dict[str, list[WindowScores]] = {}

    def process(self, result: WindowScores):
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
                               "(the runner did not fuse tokenize -> score -> merge)")


def score_row(result: WindowScores, config: JobConfig) -> dict[str, Any]:
    """The output row of a scored record (schema: pipeline.jobs.score_schema)."""
    meta = result.meta
    lp = result.logprobs.astype(np.float32)
    ids = list(meta["token_ids"])
    if not meta["conditional"] and not config.add_bos and ids:
        lp = np.concatenate([np.array([np.nan], np.float32), lp])  # the first token is unscored
    greedy = result.greedy
    if len(greedy) < len(lp):
        greedy = np.concatenate([np.zeros(len(lp) - len(greedy), bool), greedy])
    return stats_row(meta, ids, lp, greedy, config)


def empty_row(meta: dict[str, Any], config: JobConfig) -> dict[str, Any]:
    """Row of an empty text (with --allow-empty): no tokens, null statistics."""
    ids = list(meta["token_ids"])
    lp = np.full(len(ids), np.nan, np.float32)
    return stats_row(meta, ids, lp, np.zeros(len(ids), bool), config)


def stats_row(meta, ids, lp, greedy, config: JobConfig) -> dict[str, Any]:
    scored = ~np.isnan(lp)
    n = int(scored.sum())
    total = float(np.sum(lp[scored], dtype=np.float64))
    mean = total / n if n else None
    row = {
        "id": meta["id"],
        "num_tokens": n,
        "token_ids": ids,
        "token_logprobs": [None if math.isnan(x) else float(x) for x in lp],
        "sum_logprob": total,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if mean is not None else None,
        "bits_per_byte": (-total / (math.log(2) * meta["num_bytes"])
                          if n and meta["num_bytes"] else None),
        "greedy": [bool(g) for g in greedy],
    }
    if meta["conditional"]:
        row["is_greedy"] = bool(np.all(greedy[scored]))
    row.update(meta["keep"])
    return row
