"""Writing results and errors as sharded files, and reading a finished output back.

Output formats are a small registry too (`OUTPUT_FORMATS`): the `--output-format` choices come
from it, and `read_output` reads every shard by its writer's suffix.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import decimal
import io
import json
import math
from collections.abc import Callable, Iterator
from typing import IO, Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.formats import InputError
from pipeline.formats.base import open_raw
from pipeline.output import errors_path, interrupted, is_complete

PARQUET_ROW_GROUP_BYTES = 16 * 1024 * 1024


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

    With zero rows Beam writes one empty shard. `prefix` names the shards (`part` by default;
    a second writer into the same directory needs another, e.g. `part-route`).
    """

    def __init__(self, path: str, schema: pa.Schema | None = None, prefix: str = "part"):
        super().__init__()
        self._path = path
        self._prefix = prefix

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "ToJsonLine" >> beam.Map(to_json_line)
            | "WriteToText"
            >> beam.io.WriteToText(FileSystems.join(self._path, self._prefix),
                                   file_name_suffix=".jsonl")
        )


def to_delimited_line(row: dict, names: list[str], delimiter: str) -> str:
    """One CSV/TSV record (quoted where needed; no line terminator) of `row`'s `names`."""
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="").writerow(
        ["" if row.get(n) is None else row[n] if isinstance(row[n], str) else
         repr(row[n]) if isinstance(row[n], float) else str(row[n]) for n in names])
    return buf.getvalue()


class WriteDelimited(beam.PTransform):
    """Write rows as `path/part-SSSSS-of-NNNNN.csv` (or .tsv), a header row in every shard.

    The columns are the schema's names; None is an empty field, floats are written exactly
    (repr), everything else as its text.
    """

    def __init__(self, path: str, schema: pa.Schema, delimiter: str = ",",
                 suffix: str = ".csv"):
        super().__init__()
        self._path = path
        self._names = list(schema.names)
        self._delimiter = delimiter
        self._suffix = suffix

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        header = to_delimited_line({n: n for n in self._names}, self._names, self._delimiter)
        return (
            rows
            | "ToDelimitedLine" >> beam.Map(to_delimited_line, self._names, self._delimiter)
            | "WriteToText" >> beam.io.WriteToText(FileSystems.join(self._path, "part"),
                                                   file_name_suffix=self._suffix,
                                                   header=header)
        )


class WriteErrors(beam.PTransform):
    """Write error rows (dicts or SourceRecords) as JSON lines under `errors_path(path)`."""

    def __init__(self, path: str, prefix: str = "part"):
        super().__init__()
        self._path = path
        self._prefix = prefix

    def expand(self, errors: beam.PCollection) -> beam.PCollection:
        return errors | "WriteErrorsJsonl" >> WriteJsonl(errors_path(self._path),
                                                         prefix=self._prefix)


def _read_parquet(f: IO[bytes]) -> Iterator[dict]:
    yield from pq.read_table(f).to_pylist()


def _read_jsonl(f: IO[bytes]) -> Iterator[dict]:
    yield from (json.loads(line) for line in f if line.strip())


def _read_delimited(delimiter: str) -> Callable[[IO[bytes]], Iterator[dict]]:
    def read(f: IO[bytes]) -> Iterator[dict]:
        yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""),
                                  delimiter=delimiter)

    return read


class ParquetSink:
    """Rows streamed into one Parquet file: converted in small batches, written as row groups of
    about PARQUET_ROW_GROUP_BYTES (the layout Beam's WriteToParquet gives), memory flat."""

    _BATCH = 256

    def __init__(self, f: IO[bytes], schema: pa.Schema):
        self._writer = pq.ParquetWriter(f, schema, compression="snappy",
                                        use_compliant_nested_type=True)
        self._schema = schema
        self._rows: list[dict] = []
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._BATCH:
            self._convert()
            if self._bytes >= PARQUET_ROW_GROUP_BYTES:
                self._flush()

    def _convert(self) -> None:
        if self._rows:
            batch = pa.RecordBatch.from_pylist(self._rows, schema=self._schema)
            self._batches.append(batch)
            self._bytes += batch.nbytes
            self._rows = []

    def _flush(self) -> None:
        if self._batches:
            table = pa.Table.from_batches(self._batches, schema=self._schema)
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            self._batches, self._bytes = [], 0

    def close(self) -> None:
        self._convert()
        self._flush()
        self._writer.close()


class LineSink:
    """Rows streamed as text lines (JSONL, or CSV/TSV after a header line)."""

    def __init__(self, f: IO[bytes], line: Callable[[dict], str], header: str | None = None):
        self._f = f
        self._line = line
        if header is not None:
            f.write((header + "\n").encode("utf-8"))

    def write(self, row: dict) -> None:
        self._f.write((self._line(row) + "\n").encode("utf-8"))

    def close(self) -> None:
        pass  # the caller closes the file


def _delimited_sink(delimiter: str) -> Callable[[IO[bytes], pa.Schema], LineSink]:
    def sink(f: IO[bytes], schema: pa.Schema) -> LineSink:
        names = list(schema.names)
        return LineSink(f, lambda row: to_delimited_line(row, names, delimiter),
                        to_delimited_line({n: n for n in names}, names, delimiter))

    return sink


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """A registry entry: the shard suffix, the Beam writer, how to read a shard back, and a
    streaming writer of one file (`sink(file, schema)`: `.write(row)`, `.close()`), which the
    job's per-work-item output uses (`pipeline.resume`)."""

    name: str
    suffix: str
    write: Callable[[str, pa.Schema], beam.PTransform]
    read: Callable[[IO[bytes]], Iterator[dict]]
    sink: Callable[[IO[bytes], pa.Schema | None], Any]


OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("parquet", ".parquet", WriteParquet, _read_parquet, ParquetSink),
    OutputFormat("jsonl", ".jsonl", WriteJsonl, _read_jsonl,
                 lambda f, schema: LineSink(f, to_json_line)),
    # Filter jobs write CSV/TSV input back as CSV/TSV.
    OutputFormat("csv", ".csv", lambda path, schema: WriteDelimited(path, schema, ",", ".csv"),
                 _read_delimited(","), _delimited_sink(",")),
    OutputFormat("tsv", ".tsv", lambda path, schema: WriteDelimited(path, schema, "\t",
                                                                    ".tsv"),
                 _read_delimited("\t"), _delimited_sink("\t")),
)}


def write_results(path: str, output_format: str, schema: pa.Schema) -> beam.PTransform:
    """The writer of `output_format` for result rows of `schema` under `path`."""
    return OUTPUT_FORMATS[output_format].write(path, schema)


def read_output(path: str) -> list[dict]:
    """Read every `path/part-*` shard back as dicts, in file-name order.

    Meant for tests and quick inspection; it loads everything into memory. Output without a
    `_SUCCESS` marker that shows signs of an interrupted job (Beam temp files left under it or
    its errors prefix, missing shards) is refused rather than read as if it were complete.
    """
    results = FileSystems.match([FileSystems.join(path, "part-*")])
    paths = sorted(m.path for r in results for m in r.metadata_list)
    if not paths:
        raise InputError(f"no output shards under {path!r}")
    if not is_complete(path):
        problem = interrupted(path, paths)
        if problem:
            raise InputError(f"{path!r} is the output of an interrupted job ({problem}); "
                             "rerun it with --resume, or --overwrite")
    rows: list[dict] = []
    for shard in paths:
        fmt = next((f for f in OUTPUT_FORMATS.values() if shard.endswith(f.suffix)), None)
        if fmt is None:
            raise InputError(f"{shard!r} is not a shard of a known output format")
        with open_raw(shard) as f:
            rows.extend(fmt.read(f))
    return rows
