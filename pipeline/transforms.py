"""Record-level steps: parse/validate, tokenize into a mode's work items, bucket and batch.

Every step that can reject a record sends it to the tagged output `errors` with its source,
line/row, id and reason; nothing is dropped silently.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from gpt2model.batching import RowPacker, step_rows
from pipeline import modes
from pipeline.config import JobConfig, default_buckets
from pipeline.formats import SourceRecord
from pipeline.metrics import ERRORS as ERRORS_METRIC
from pipeline.metrics import counter
from pipeline.records import ERRORS, Record, clean_str, clean_value, default_id, error_row


class ParseRecords(beam.DoFn):
    """SourceRecord -> Record, or an error row naming the field and the problem."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.errors = counter(ERRORS_METRIC)

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
        fields = [cfg.source_field]
        if cfg.context_field and not cfg.choices_field:
            fields.append(cfg.context_field)
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
        # A multiple-choice context may be empty: it is then <|endoftext|>, as in lm-eval.
        if not text and not (cfg.mode == "score" and (cfg.allow_empty or cfg.choices_field)):
            what = "prompt" if cfg.mode == "generate" else "text"
            yield self._error(rec, record_id, f"empty {what} in field {cfg.source_field!r}", raw)
            return
        choices = label = None
        if cfg.choices_field:
            problem, choices, label = _choices(value, cfg.choices_field, cfg.label_field)
            if problem:
                yield self._error(rec, record_id, problem, raw)
                return
        keep = {k: clean_value(value.get(k)) for k in cfg.keep_fields}
        original = clean_value(value) if cfg.mode == "filter" else None
        yield Record(f"{rec.source}:{rec.index}", record_id, text,
                     texts[1] if len(texts) > 1 else None, keep, rec.source, rec.index,
                     choices, label, original)

    def _error(self, rec: SourceRecord, record_id, reason, raw=None):
        self.errors.inc()
        return beam.pvalue.TaggedOutput(
            ERRORS, error_row(rec.source, rec.index, record_id, reason, raw or rec.raw))


def _choices(value: dict, field: str, label_field: str | None
             ) -> tuple[str | None, tuple[str, ...] | None, int | None]:
    """(problem, choices, label) of a multiple-choice record; problem None when it is valid."""
    choices = value.get(field)
    if choices is None:
        return f"{'missing' if field not in value else 'null'} field {field!r}", None, None
    if isinstance(choices, str):
        # CSV/TSV hold strings only: a JSON list in a cell is the way to give choices there.
        try:
            import json

            choices = json.loads(choices)
        except ValueError:
            return f"field {field!r} is a string, not a list of strings", None, None
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        return f"field {field!r} must be a list of strings", None, None
    if not choices:
        return f"field {field!r} is an empty list", None, None
    empty = next((i for i, c in enumerate(choices) if not c), None)
    if empty is not None:
        return f"choice {empty} in field {field!r} is an empty string", None, None
    label = None
    if label_field:
        label = value.get(label_field)
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)  # CSV/TSV: every value is a string
        if isinstance(label, bool) or not isinstance(label, int):
            return (f"label field {label_field!r} is {label!r}, expected the index of a "
                    "choice"), None, None
        if not 0 <= label < len(choices):
            return (f"label {label} in field {label_field!r} is out of range for "
                    f"{len(choices)} choices"), None, None
    return None, tuple(clean_str(c) for c in choices), label


class Tokenize(beam.DoFn):
    """Record -> the mode's work items. The tokenizer and context size load once per worker."""

    def __init__(self, config: JobConfig):
        self.config = config

    def setup(self) -> None:
        from gpt2model import GPT2Config

        self.tokenizer = job_tokenizer(self.config.model)
        self.context = GPT2Config.from_pretrained(self.config.model).n_positions
        self.errors = counter(ERRORS_METRIC)
        self.mode = modes.for_config(self.config)

    def process(self, rec: Record):
        try:  # a record's items are few (its windows or samples): listed, then emitted
            outs = list(self.mode.make_items(rec, self.config, self.tokenizer, self.context))
        except ValueError as err:  # text the tokenizer refuses (lone surrogates)
            outs = [beam.pvalue.TaggedOutput(ERRORS, rec.error(str(err)))]
        for out in outs:
            if isinstance(out, beam.pvalue.TaggedOutput) and out.tag == ERRORS:
                self.errors.inc()
            yield out


def job_tokenizer(model: str) -> Any:
    """The model's tokenizer, built once per process while its files stay the same.

    A job needs it three times in one process (the launch checks, the tokenize step, the model
    step), each build ~0.1-0.2 s of start-up on the 2-core CPU. Keyed by the model and, for a
    local directory, its tokenizer files' identity and modification time, so a checkpoint
    rewritten in place is read again; a Hub model here is pinned to a commit. Only our steps
    share the object, and they do not change it.
    """
    from gpt2model.tokenizer import MERGES_FILE, TOKENIZER_FILE, VOCAB_FILE

    directory = os.path.expanduser(model)
    state = None
    if os.path.isdir(directory):
        state = []
        for name in (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE):
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            state.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        state = tuple(state)
    return _built_tokenizer(model, state)


@functools.lru_cache(maxsize=8)
def _built_tokenizer(model: str, state: Any) -> Any:
    from gpt2model import get_tokenizer

    return get_tokenizer(model)


def bucket_lengths(config: JobConfig, context: int, extra: int = 0) -> tuple[int, ...]:
    """The padded lengths work items are bucketed into; the last one is always what fits."""
    top = context - extra
    buckets = [b for b in (config.bucket_boundaries or default_buckets(context)) if b < top]
    return (*buckets, top)


def rows_for(length: int, config: JobConfig, extra: int = 0) -> int:
    """Rows per batch of a bucket from the token budget (at least one)."""
    return max(1, config.batch_token_budget() // (length + extra))


def padded_rows(used: int, length: int, config: JobConfig, extra: int = 0) -> int:
    """Rows a batch of `used` rows is padded to: the next multiple of 1/tail_steps of the full
    row count. A bundle's last batch is usually part-filled; padding it to the full count costs
    up to a whole batch of compute, while each extra row count is one more compile per length,
    so the steps stay few."""
    return step_rows(used, rows_for(length, config, extra), config.tail_steps)


def _at_bundle_end(value):
    """A value emitted from finish_bundle, which must carry its window explicitly."""
    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


class BucketBatch(beam.DoFn):
    """Group work items by padded length and emit (length, items) batches of a fixed row count.

    Why not Beam's BatchElements: its batch size is an element count tuned adaptively from
    timings (every new size is a recompile), and its length buckets only exist in its stateful
    mode, which shuffles on (worker, bucket). Here each bucket's row count comes from the token
    budget, so each bucket has one padded shape and compiles once. Batching is per bundle, with no
    GroupByKey, so parallelism is not capped by the number of buckets.
    """

    def __init__(self, config: JobConfig, context: int, extra: int = 0, groups: int = 1):
        """groups: batches' worth of items per emitted batch (generation streams them through
        one batch's rows, refilling a row as its sample ends)."""
        self.buckets = bucket_lengths(config, context, extra)
        self.config = config
        self.extra = extra
        self.groups = groups

    def start_bundle(self) -> None:
        self.pending: dict[int, list] = defaultdict(list)
        # Items per emitted batch of each bucket, from the budget once per bundle (on the
        # worker: its default follows the worker's backend), not once per item.
        self.full = {b: self.groups * rows_for(b, self.config, self.extra) for b in self.buckets}

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"work item of {length} tokens exceeds the largest bucket "
                         f"{self.buckets[-1]}")

    def process(self, item):
        b = self.bucket(item.length)
        self.pending[b].append(item)
        if len(self.pending[b]) >= self.full[b]:
            yield b, self.pending.pop(b)

    def finish_bundle(self):
        for b, items in self.pending.items():
            yield _at_bundle_end((b, items))
        self.pending = defaultdict(list)


class PackBatch(beam.DoFn):
    """Pack score items several to a row: (context, rows of items) batches of one shape.

    Short texts share a row (each attends only to itself), so padding stays low with a single
    compiled shape per worker; see gpt2model.batching.RowPacker. Per bundle, like BucketBatch.
    """

    def __init__(self, config: JobConfig, context: int):
        self.config, self.length = config, context

    def start_bundle(self) -> None:
        # Rows from the budget here, on the worker: its default follows the worker's backend.
        self.packer = RowPacker(self.length, rows_for(self.length, self.config))

    def process(self, item):
        for rows in self.packer.add(item, item.length):
            yield self.length, rows

    def finish_bundle(self):
        for rows in self.packer.flush():
            yield _at_bundle_end((self.length, rows))


def one_per_row(batch: tuple[int, list]) -> tuple[int, list[list]]:
    """A bucketed batch as rows of one item each (the model step's input form)."""
    length, items = batch
    return length, [[it] for it in items]
