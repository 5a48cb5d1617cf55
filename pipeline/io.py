"""Input and output for the pipeline: raw records from JSONL/Parquet shards, results and errors out.

The readers only *parse*; field validation happens downstream. Their contract is that no input
line or row is ever dropped silently: each one becomes a `SourceRecord` carrying either a parsed
value or an error reason, so "records in" can always be reconciled with "results + errors out".

All file access goes through Beam's `FileSystems`, so any registered filesystem (local, gs:// with
the gcp extra, s3:// with the aws extra) works the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import gzip
import json
import math
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

METRICS_NAMESPACE = "gpt2pipeline"
INPUT_FORMATS = ("jsonl", "parquet")
RAW_PREVIEW_CHARS = 1000
PARQUET_ROW_GROUP_BYTES = 16 * 1024 * 1024

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_GZIP_MAGIC = b"\x1f\x8b"
# Rows converted to Python objects at a time; bounds memory for row groups of large rows.
_PARQUET_BATCH_ROWS = 1024
# What a corrupt or truncated file can raise while we decode it; these become error records so
# one bad shard cannot fail the job. Anything else (a bug) propagates and fails the bundle. OSError
# also covers transient I/O failures; the gcs/s3 clients retry those internally before raising.
_CORRUPT_DATA_ERRORS = (EOFError, zlib.error, OSError, ValueError, pa.ArrowException)


class InputError(ValueError):
    """The input pattern cannot be read as asked; the message is one line, fit for a CLI."""


class OutputExistsError(ValueError):
    """The output location already holds files and overwriting was not requested."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceRecord:
    """One input line (JSONL) or row (Parquet), parsed or not.

    Attributes:
      source: path of the file it came from.
      index: 0-based line number (JSONL) or file-global row number (Parquet); -1 when the error
        concerns the whole file (unreadable Parquet footer, file that cannot be opened).
      value: the parsed JSON object or Parquet row as plain Python; None when `error` is set.
      raw: the raw text (or a JSON-ish preview of a Parquet row), truncated to 1000 characters,
        kept so that downstream validation errors can quote the input.
      error: why the line/row could not be parsed; None on success.
    """

    source: str
    index: int
    value: dict | None
    raw: str | None
    error: str | None


# --------------------------------------------------------------------------------------------
# Format detection and up-front checks.


def detect_format(path: str, input_format: str | None = None) -> str:
    """Return "jsonl" or "parquet" for `path`: the explicit `input_format` wins over the extension.

    Raises InputError for an unknown `input_format`, or for an unknown extension when no format
    was given, so the CLI can reject the job before any work starts.
    """
    if input_format is not None:
        if input_format not in INPUT_FORMATS:
            raise InputError(
                f"unknown input format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}"
            )
        return input_format
    lower = path.lower()
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(
        f"cannot tell the format of {path!r} from its extension "
        f"(known: {', '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)}); pass an input format"
    )


def check_input(pattern: str, input_format: str | None = None) -> list[str]:
    """Match `pattern` now and return the sorted file paths, or raise InputError.

    Run by the CLI before building the pipeline: an empty match, a file that cannot be opened or
    (without `input_format`) an unknown extension is a one-line error instead of a failed job
    minutes later on a worker.
    """
    try:
        results = FileSystems.match([pattern])
    except Exception as e:  # BeamIOError wraps whatever the filesystem raised.
        raise InputError(f"cannot list input {pattern!r}: {_one_line(e)}") from e
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise InputError(f"no input files match {pattern!r}")
    for path in paths:
        detect_format(path, input_format)
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                f.read(1)
        except Exception as e:
            raise InputError(f"cannot open input file {path!r}: {_one_line(e)}") from e
    return paths


# --------------------------------------------------------------------------------------------
# Reading.


class _Shard(NamedTuple):
    """A unit of read work: a whole JSONL file, or one row group of a Parquet file."""

    path: str
    fmt: str
    row_group: int = -1
    first_row: int = 0
    num_rows: int = 0


def _one_line(e: BaseException) -> str:
    """`Type: message` on one printable line (error reports are JSON lines read by people)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _open_lines(path: str):
    """Open `path` as a binary line stream, gunzipping when the content is gzip.

    Gzip is detected from the magic bytes, not the name, so a gzip file with a plain name still
    reads. Decompression uses the stdlib `gzip` module rather than Beam's CompressionTypes.AUTO:
    Beam's CompressedFile (2.77) silently stops at a truncated gzip stream, returning the partial
    last line as if it were complete, while `gzip.GzipFile` raises EOFError, which we report.
    """
    handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        magic = handle.read(2)
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=handle, mode="rb"), handle
    return handle, handle


def _parse_json_line(path: str, index: int, line: bytes) -> SourceRecord:
    """Turn one raw JSONL line (newline included or not) into a SourceRecord."""
    line = line.rstrip(b"\r\n")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raw = line[: RAW_PREVIEW_CHARS * 4].decode("utf-8", "backslashreplace")
        return SourceRecord(
            path, index, None, raw[:RAW_PREVIEW_CHARS], f"invalid UTF-8 at byte {e.start}"
        )
    if index == 0 and text.startswith("\ufeff"):
        text = text[1:]
    raw = text[:RAW_PREVIEW_CHARS]
    if not text.strip():
        return SourceRecord(path, index, None, raw, "blank line")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return SourceRecord(path, index, None, raw, f"invalid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return SourceRecord(path, index, None, raw, "invalid JSON: nested too deeply")
    if not isinstance(value, dict):
        return SourceRecord(
            path, index, None, raw, f"JSON value is not an object (got {type(value).__name__})"
        )
    return SourceRecord(path, index, value, raw, None)


def read_jsonl_file(path: str) -> Iterator[SourceRecord]:
    """Yield one SourceRecord per line of a JSONL file (plain or gzip), streaming.

    Lines are split on b"\\n" only (so U+2028 inside a JSON string is not a line break, unlike
    `str.splitlines`), and each is decoded strictly on its own, so one bad line costs one error
    record. If the stream breaks mid-way (truncated or corrupt gzip), the lines read so far are
    kept and one error record at the next line number reports the failure.
    """
    index = 0
    try:
        stream, handle = _open_lines(path)
    except _CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, -1, None, None, f"cannot open file: {_one_line(e)}")
        return
    try:
        for line in stream:
            yield _parse_json_line(path, index, line)
            index += 1
    except _CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(
            path, index, None, None, f"file unreadable from line {index} on: {_one_line(e)}"
        )
    finally:
        stream.close()
        handle.close()


def plan_parquet_file(path: str) -> Iterator[_Shard | SourceRecord]:
    """Read a Parquet footer and yield one `_Shard` per row group with its first global row.

    A footer that cannot be read yields a single error SourceRecord with index -1 instead: the
    file's row count is unknowable then, so one record stands for all of its rows.
    """
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            metadata = pq.ParquetFile(f).metadata
    except _CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, -1, None, None, f"unreadable parquet footer: {_one_line(e)}")
        return
    first = 0
    for i in range(metadata.num_row_groups):
        rows = metadata.row_group(i).num_rows
        yield _Shard(path, "parquet", i, first, rows)
        first += rows


def _row_preview(row: dict) -> str:
    """A JSON-ish rendering of a row, truncated; long values are cut first to keep it cheap."""

    def cut(v: Any) -> Any:
        if isinstance(v, str | bytes):
            return v[:RAW_PREVIEW_CHARS]
        if isinstance(v, list):
            return [cut(x) for x in v[:100]]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    text = json.dumps({k: cut(v) for k, v in row.items()}, ensure_ascii=False, default=str)
    return text[:RAW_PREVIEW_CHARS]


def read_parquet_row_group(shard: _Shard) -> Iterator[SourceRecord]:
    """Yield one SourceRecord per row of one row group, indexed by file-global row number.

    If decoding fails part-way, the rows read so far are kept and one error record at the first
    unread row names the range of rows lost (the footer tells us how many there were).
    """
    index = shard.first_row
    end = shard.first_row + shard.num_rows
    try:
        with FileSystems.open(shard.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            batches = pq.ParquetFile(f).iter_batches(
                batch_size=_PARQUET_BATCH_ROWS, row_groups=[shard.row_group], use_threads=False
            )
            for batch in batches:
                for row in batch.to_pylist():
                    yield SourceRecord(shard.path, index, row, _row_preview(row), None)
                    index += 1
    except _CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(
            shard.path,
            index,
            None,
            None,
            f"unreadable parquet rows {index}..{end - 1} (row group {shard.row_group}): "
            f"{_one_line(e)}",
        )
        return
    if index != end:
        yield SourceRecord(
            shard.path,
            index,
            None,
            None,
            f"parquet row group {shard.row_group} has {index - shard.first_row} rows, "
            f"footer says {shard.num_rows}",
        )


class _PlanReads(beam.DoFn):
    """Matched file -> read work items; an unreadable file becomes its error SourceRecord.

    The error records travel with the work items (through the Reshuffle, passed on untouched by
    `_ReadShards`) rather than in a side output joined later: a Flatten of two stages' outputs
    ends a fused stage, and the DirectRunner would then hold every record of the corpus in
    memory before the next step starts.
    """

    def __init__(self, input_format: str | None):
        self._input_format = input_format
        self._errors = Metrics.counter(METRICS_NAMESPACE, "read_errors")

    # No type hints on process(): Beam would try to derive schema coders from them.
    def process(self, readable):
        path = readable.metadata.path
        try:
            fmt = detect_format(path, self._input_format)
        except InputError as e:
            # check_input rejects this up front; inside a running job, report and go on.
            self._errors.inc()
            yield SourceRecord(path, -1, None, None, str(e))
            return
        if fmt == "jsonl":
            yield _Shard(path, "jsonl")
            return
        for item in plan_parquet_file(path):
            if isinstance(item, SourceRecord):
                self._errors.inc()
            yield item


class _ReadShards(beam.DoFn):
    """Work item -> SourceRecords, counting parsed records and errors."""

    def __init__(self):
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._errors = Metrics.counter(METRICS_NAMESPACE, "read_errors")

    def process(self, shard):
        if isinstance(shard, SourceRecord):  # a file-level error from planning, counted there
            yield shard
            return
        records = (
            read_jsonl_file(shard.path) if shard.fmt == "jsonl" else read_parquet_row_group(shard)
        )
        ok = bad = 0
        try:
            for record in records:
                if record.error is None:
                    ok += 1
                else:
                    bad += 1
                yield record
        finally:
            self._read.inc(ok)
            self._errors.inc(bad)


class ReadRecords(beam.PTransform):
    """Read every file matching `pattern` into SourceRecords (one per line or row, or an error).

    The format comes from each file's extension (.jsonl, .json, .jsonl.gz, .json.gz, .parquet)
    unless `input_format` ("jsonl" or "parquet") is given. Metrics (namespace "gpt2pipeline"):
    `records_read` counts parsed records, `read_errors` error records; their sum is the number of
    SourceRecords produced.

    Why not Beam's built-in readers: ReadFromText does not expose line numbers, which we need for
    stable record ids and error reports, and it dies on a bad gzip stream instead of reporting
    it. parquetio.ReadFromParquet neither yields row numbers nor turns a corrupt footer or row
    group into data. So files are planned into work items (a JSONL file, or a Parquet row group
    with its first global row number, read from the footer), a Reshuffle spreads the items over
    workers, and a DoFn streams each item. A Parquet file whose footer is unreadable becomes ONE
    error record with index -1, since its row count cannot be known.
    """

    def __init__(self, pattern: str, input_format: str | None = None):
        super().__init__()
        if input_format is not None:
            detect_format("", input_format)  # validates eagerly, at pipeline construction
        self._pattern = pattern
        self._input_format = input_format

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern)
            | "ReadMatches" >> fileio.ReadMatches()
            | "PlanReads" >> beam.ParDo(_PlanReads(self._input_format))
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(_ReadShards())
        )


# --------------------------------------------------------------------------------------------
# Output locations.


def errors_path(path: str) -> str:
    """Where the error records of an output `path` go: a sibling prefix `path-errors`."""
    return path.rstrip("/") + "-errors"


# Written by `pipeline.jobs.run` after both the results and the errors are finalized: the only
# sign that an output is complete. Beam renames each finished shard into place, so no part-*
# file is ever partial, but a job killed between the renames of its two outputs (or of several
# shards) leaves complete-looking shards of an incomplete run. Spark/Hadoop use the same name.
SUCCESS_MARKER = "_SUCCESS"
# Beam's FileBasedSink writes into `<output>/beam-temp-<prefix>-<uuid>/` and renames from there.
_BEAM_TEMP = "beam-temp-"


def mark_complete(path: str, text: str) -> None:
    """Write `path/_SUCCESS` (with `text`, e.g. the job summary): the output is complete."""
    with FileSystems.create(FileSystems.join(path, SUCCESS_MARKER)) as f:
        f.write(text.encode("utf-8"))


def is_complete(path: str) -> bool:
    """Whether `path` holds the output of a job that ran to the end (its `_SUCCESS` exists)."""
    return FileSystems.exists(FileSystems.join(path, SUCCESS_MARKER))


def _interrupted(path: str, shards: list[str]) -> str | None:
    """Why `path` (without a marker) looks like a killed job's output, or None."""
    for prefix in (path, errors_path(path)):
        leftovers = [f for f in _existing_files(prefix) if _BEAM_TEMP in f]
        if leftovers:
            return f"unfinished temp file {leftovers[0]!r}"
    counts: dict[int, set[int]] = defaultdict(set)
    for shard in shards:
        match = re.search(r"part-(\d+)-of-(\d+)", shard.rsplit("/", 1)[-1])
        if match:
            counts[int(match[2])].add(int(match[1]))
    for total, seen in counts.items():
        if len(counts) > 1 or seen != set(range(total)):
            return f"shards {sorted(seen)} of {total}"
    return None


def _existing_files(prefix: str) -> list[str]:
    try:
        results = FileSystems.match([FileSystems.join(prefix, "**")])
    except Exception as e:
        raise OutputExistsError(f"cannot list output location {prefix!r}: {_one_line(e)}") from e
    return sorted(m.path for r in results for m in r.metadata_list)


def _is_under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or lies below it (local paths compared absolute)."""
    if "://" not in path and "://" not in prefix:
        path, prefix = os.path.abspath(path), os.path.abspath(prefix)
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def prepare_output(path: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Make sure the output prefixes `path` and `errors_path(path)` hold no files.

    Beam names shards `part-SSSSS-of-NNNNN`, so a rerun with a different shard count would leave
    old shards next to new ones and readers would mix two runs. Hence: refuse when files exist,
    or with `overwrite` delete them (the `_SUCCESS` marker and the `beam-temp-*` files of a
    killed run included). Refused always: an input file (of `inputs`) under either prefix,
    which overwriting would delete before it is read, and a local prefix that is a file.
    """
    for prefix in (path, errors_path(path)):
        clash = next((f for f in inputs if _is_under(f, prefix)), None)
        if clash is not None:
            raise InputError(f"input file {clash!r} lies under the output location {prefix!r}; "
                             "choose an --output outside the input")
        if "://" not in prefix and os.path.exists(prefix) and not os.path.isdir(prefix):
            raise OutputExistsError(f"output location {prefix!r} is an existing file, not a "
                                    "directory; choose another --output")
    existing = _existing_files(path) + _existing_files(errors_path(path))
    if not existing:
        return
    # The marker goes first: an overwrite killed half-way must not leave it next to a remnant.
    existing.sort(key=lambda f: not f.endswith("/" + SUCCESS_MARKER))
    if not overwrite:
        raise OutputExistsError(
            f"output {path!r} already holds {len(existing)} file(s) (e.g. {existing[0]!r}); "
            "pass --overwrite to replace them"
        )
    FileSystems.delete(existing)


# --------------------------------------------------------------------------------------------
# Writing.


def _jsonable(value: Any) -> Any:
    """Convert to what json.dumps accepts, as strict JSON (non-finite floats become null)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def to_json_line(row: Any) -> str:
    """One strict-JSON line for `row`: numpy values converted, NaN/inf as null, UTF-8 kept."""
    return json.dumps(_jsonable(row), ensure_ascii=False, allow_nan=False)


class WriteParquet(beam.PTransform):
    """Write dict rows as `path/part-SSSSS-of-NNNNN.parquet` with an explicit Arrow schema.

    Beam writes into a temp directory and renames on finalize, so a failed job leaves no partial
    shards under `path`. With zero rows Beam still writes one shard: a valid Parquet file with
    the schema and no row groups, which `read_output` reads back as [].
    """

    def __init__(self, path: str, schema: pa.Schema, codec: str = "snappy"):
        super().__init__()
        self._path = path
        self._schema = schema
        self._codec = codec

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteToParquet" >> beam.io.WriteToParquet(
            file_path_prefix=FileSystems.join(self._path, "part"),
            schema=self._schema,
            codec=self._codec,
            # The standard list layout ("element"), readable by Spark/BigQuery as well.
            use_compliant_nested_type=True,
            file_name_suffix=".parquet",
            # Rows are buffered until a row group is this big (Beam's default: 64 MB); smaller
            # keeps a worker's memory flat, and score rows are small, so groups stay large.
            row_group_buffer_size=PARQUET_ROW_GROUP_BYTES,
        )


class WriteJsonl(beam.PTransform):
    """Write rows as strict JSON lines to `path/part-SSSSS-of-NNNNN.jsonl` (see `to_json_line`).

    With zero rows Beam writes one empty shard.
    """

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "ToJsonLine" >> beam.Map(to_json_line)
            | "WriteToText"
            >> beam.io.WriteToText(FileSystems.join(self._path, "part"), file_name_suffix=".jsonl")
        )


class WriteErrors(beam.PTransform):
    """Write error rows (dicts or SourceRecords) as JSON lines under `errors_path(path)`."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, errors: beam.PCollection) -> beam.PCollection:
        return errors | "WriteErrorsJsonl" >> WriteJsonl(errors_path(self._path))


def read_output(path: str) -> list[dict]:
    """Read every `path/part-*` shard (.parquet or .jsonl) back as dicts, in file-name order.

    Meant for tests and quick inspection; it loads everything into memory. Output without a
    `_SUCCESS` marker that shows signs of an interrupted job (Beam temp files left under it or
    its errors prefix, missing shards) is refused rather than read as if it were complete.
    """
    results = FileSystems.match([FileSystems.join(path, "part-*")])
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise InputError(f"no output shards under {path!r}")
    if not is_complete(path):
        problem = _interrupted(path, paths)
        if problem:
            raise InputError(f"{path!r} is the output of an interrupted job ({problem}); "
                             "rerun it with --overwrite")
    rows: list[dict] = []
    for shard in paths:
        fmt = detect_format(shard)
        with FileSystems.open(shard, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if fmt == "parquet":
                rows.extend(pq.read_table(f).to_pylist())
            else:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows
