"""Reading a job's input: match the files, check them up front, plan work items, stream records.

Why not Beam's built-in readers: ReadFromText does not expose line numbers, which we need for
stable record ids and error reports, and it dies on a bad gzip stream instead of reporting it;
parquetio.ReadFromParquet neither yields row numbers nor turns a corrupt footer or row group
into data. So files are planned into work items (a file, or a Parquet row group with its first
global row number), a Reshuffle spreads them over workers, and a DoFn streams each one through
its format's reader (`pipeline.formats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline import formats
from pipeline.formats import InputError, SourceRecord, WorkItem, detect_format, one_line
from pipeline.formats.base import OPEN, item_key, open_raw, position
from pipeline.metrics import READ_ERRORS, RECORDS_READ, REREAD_ERRORS, REREAD_RECORDS, counter


def check_input(pattern: str, input_format: str | None = None) -> list[str]:
    """Match `pattern` now and return the sorted file paths, or raise InputError.

    Run before building the pipeline: an empty match, a file that cannot be opened or (without
    `input_format`) an unknown extension is a one-line error instead of a failed job minutes
    later on a worker.
    """
    try:
        results = FileSystems.match([pattern])
    except Exception as e:  # BeamIOError wraps whatever the filesystem raised.
        raise InputError(f"cannot list input {pattern!r}: {one_line(e)}") from e
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise InputError(f"no input files match {pattern!r}")
    for path in paths:
        detect_format(path, input_format)
        try:
            with open_raw(path) as f:
                f.read(1)
        except Exception as e:
            raise InputError(f"cannot open input file {path!r}: {one_line(e)}") from e
    return paths


def input_bytes(files: Sequence[str]) -> int:
    """Total size of the input files (what progress measures the read against)."""
    results = FileSystems.match(list(files))
    return sum(m.size_in_bytes or 0 for r in results for m in r.metadata_list)


def input_facts(files: Sequence[str], input_format: str | None, required: Iterable[str] = ()
                ) -> tuple[int | None, dict[str, pa.DataType]]:
    """(total records when every file's header tells, Arrow types of the columns known).

    A field in `required` that a file's header lacks is refused here (InputError naming the
    file and its columns) for formats whose columns are strict (CSV/TSV); elsewhere it is
    reported record by record. A file whose header cannot be read is left to the reader,
    which turns it into error records.
    """
    total: int | None = 0
    types: dict[str, pa.DataType] = {}
    typed = True  # False once a file's format has no column types (JSONL): kept fields are
    # then written as JSON text for every file, so one output column has one type
    for path in files:
        fmt = formats.get(detect_format(path, input_format))
        try:
            facts = fmt.facts(path)
        except Exception:  # a corrupt file becomes error records during the run
            total = None
            continue
        total = None if total is None or facts.num_rows is None else total + facts.num_rows
        if facts.columns is None:
            typed = False
            continue
        missing = [name for name in required if name not in facts.columns]
        if missing and fmt.columns_required and facts.columns:
            columns = list(facts.columns)
            hint = ""
            if len(columns) == 1 and any(d in columns[0] for d in ",\t;|"):
                hint = "; is the delimiter right? (--input-format csv or tsv)"
            raise InputError(f"{path!r} has no column {missing[0]!r} (its header has "
                             f"{len(columns)} column(s): {', '.join(map(repr, columns[:10]))})"
                             f"{hint}")
        for name, dtype in facts.columns.items():
            types.setdefault(name, dtype)
    return total, types if typed else {}


class _PlanReads(beam.DoFn):
    """Matched file -> read work items; an unreadable file becomes its error SourceRecord.

    The error records travel with the work items (through the Reshuffle, passed on untouched by
    `_ReadItems`) rather than in a side output joined later: a Flatten of two stages' outputs
    ends a fused stage, and the DirectRunner would then hold every record of the corpus in
    memory before the next step starts.
    """

    def __init__(self, input_format: str | None, counted: bool = True,
                 done: frozenset[str] = frozenset()):
        self._input_format = input_format
        self._errors = counter(READ_ERRORS if counted else REREAD_ERRORS)
        self._done = done  # --resume: keys of the work items already written

    # No type hints on process(): Beam would try to derive schema coders from them.
    def process(self, readable):
        path = readable.metadata.path
        try:
            name = detect_format(path, self._input_format)
        except InputError as e:
            # check_input rejects this up front; inside a running job, report and go on.
            self._errors.inc()
            yield SourceRecord(path, -1, None, None, str(e))
            return
        items = list(formats.get(name).plan(path, name))  # a file's few work items
        size = readable.metadata.size_in_bytes or 0
        rows = sum(it.num_rows for it in items if isinstance(it, WorkItem))
        for item in items:
            if isinstance(item, SourceRecord):
                if item_key(path) not in self._done:
                    self._errors.inc()
                    yield item
                continue
            share = item.num_rows / rows if item.row_group >= 0 and rows else 1.0
            yield dataclasses.replace(item, weight=size * share, done=item.key in self._done)


class _ReadItems(beam.DoFn):
    """Work item -> SourceRecords, counting parsed records and errors (unless told not to)."""

    def __init__(self, counted: bool = True, progress_id: str | None = None,
                 ledger: Any = None):
        self._read = counter(RECORDS_READ if counted else REREAD_RECORDS)
        self._errors = counter(READ_ERRORS if counted else REREAD_ERRORS)
        self._progress_id = progress_id
        self._ledger_spec = ledger  # per-item output (pipeline.resume.Spec), or None

    def setup(self) -> None:
        from pipeline import resume
        from pipeline.progress import progress_for

        self._progress = progress_for(self._progress_id)
        self._ledger = resume.ledger(self._ledger_spec) if self._ledger_spec else None

    def process(self, item):
        if isinstance(item, SourceRecord):  # a file-level error from planning, counted there
            key = item_key(item.source)
            if self._ledger is not None:
                self._ledger.begin(item.source, -1, key)
            yield item
            if self._ledger is not None:
                self._ledger.read_done(key, 0, 1)
            return
        assert isinstance(item, WorkItem)
        if item.done:  # --resume: written by the interrupted run
            if self._progress is not None:
                self._progress.read(item.weight)
            return
        ok = bad = 0
        reported = 0.0  # of the item's weight, shown as read so far
        first, end = (item.first_row, item.first_row + item.num_rows) if item.row_group >= 0 \
            else (-1, None)
        if self._ledger is not None:
            self._ledger.begin(item.path, first, item.key)
        try:
            for record in formats.get(item.format).read(item):
                if record.error is None:
                    ok += 1
                else:
                    bad += 1
                if self._ledger is not None and end is not None and \
                        not first <= record.index < end:
                    self._ledger.claim(item.path, record.index, item.key)
                if self._progress is not None and (ok + bad) % 256 == 0:
                    at = position(item.path)
                    if at is not None and item.row_group < 0:
                        self._progress.read(max(0.0, min(at, item.weight) - reported))
                        reported = max(reported, min(at, item.weight))
                yield record
        finally:
            self._read.inc(ok)
            self._errors.inc(bad)
            OPEN.pop(item.path, None)
            if self._progress is not None:
                self._progress.read(max(0.0, item.weight - reported))
        if self._ledger is not None:  # not in `finally`: a failed read is retried, not done
            self._ledger.read_done(item.key, ok, bad)


class ReadRecords(beam.PTransform):
    """Read every file matching `pattern` into SourceRecords (one per line or row, or an error).

    The format comes from each file's suffix (see `pipeline.formats`) unless `input_format` is
    given. Metrics: `records_read` counts parsed records, `read_errors` error records; their sum
    is the number of SourceRecords produced. A Parquet file whose footer is unreadable becomes
    ONE error record with index -1, since its row count cannot be known.
    """

    def __init__(self, pattern: str, input_format: str | None = None, counted: bool = True,
                 progress_id: str | None = None, ledger: Any = None,
                 done: frozenset[str] = frozenset()):
        """counted=False: a job reading its own intermediate files, whose records were
        counted as input when first read; progress_id: the run whose progress shows the bytes
        read (`pipeline.progress`); ledger: the run's per-item output (`pipeline.resume.Spec`)
        that learns each item's record count; done: keys of items not to read again."""
        super().__init__()
        if input_format is not None:
            formats.get(input_format)  # validates eagerly, at pipeline construction
        self._pattern = pattern
        self._input_format = input_format
        self._counted = counted
        self._progress_id = progress_id
        self._ledger = ledger
        self._done = done

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern)
            | "ReadMatches" >> fileio.ReadMatches()
            | "PlanReads" >> beam.ParDo(_PlanReads(self._input_format, self._counted,
                                                    self._done))
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(_ReadItems(self._counted, self._progress_id,
                                                    self._ledger))
        )
