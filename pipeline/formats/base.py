"""What every input format shares: the records it yields, its work items, its registry entry.

A reader only *parses*; field validation happens downstream. Its contract is that no input line
or row is ever dropped silently: each one becomes a `SourceRecord` carrying either a parsed value
or an error reason, so "records in" can always be reconciled with "results + errors out".

All file access goes through Beam's `FileSystems`, so any registered filesystem (local, gs://
with the gcp extra, s3:// with the aws extra) works the same way.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

import pyarrow as pa

RAW_PREVIEW_CHARS = 1000
_GZIP_MAGIC = b"\x1f\x8b"
# What a corrupt or truncated file can raise while we decode it; these become error records so
# one bad shard cannot fail the job. Anything else (a bug) propagates and fails the bundle. OSError
# also covers transient I/O failures; the gcs/s3 clients retry those internally before raising.
# OverflowError: a damaged value past what Python can hold (a duration of 10^9 days).
CORRUPT_DATA_ERRORS = (EOFError, zlib.error, OSError, ValueError, OverflowError,
                       pa.ArrowException)


class InputError(ValueError):
    """The input pattern cannot be read as asked; the message is one line, fit for a CLI."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceRecord:
    """One input line (JSONL), row (Parquet, CSV), parsed or not.

    Attributes:
      source: path of the file it came from.
      index: 0-based record number in the file: the line (JSONL), the file-global row (Parquet),
        the data row after the header (CSV/TSV); -1 when the error concerns the whole file
        (unreadable Parquet footer, file that cannot be opened).
      value: the parsed record as a dict of plain Python values; None when `error` is set.
      raw: the raw text (or a JSON-ish preview of a row), truncated to 1000 characters, kept so
        that downstream validation errors can quote the input.
      error: why the record could not be parsed; None on success.
    """

    source: str
    index: int
    value: dict | None
    raw: str | None
    error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkItem:
    """A unit of read work: a whole file, or one Parquet row group with its first global row."""

    path: str
    format: str
    row_group: int = -1
    first_row: int = 0
    num_rows: int = 0
    weight: float = 0.0  # bytes of the input it stands for (progress): a file, or its row share
    done: bool = False  # --resume: its results are already written; read nothing, count its bytes

    @property
    def key(self) -> str:
        """Its stable name in the output (`part-<key>.<ext>`, see `pipeline.resume`)."""
        return item_key(self.path, self.row_group)


def item_key(path: str, row_group: int = -1) -> str:
    """A work item's stable, file-name-safe name: the file's stem, a hash of its whole path (two
    inputs named alike in different directories differ) and the row group, if any."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.rstrip("/").rsplit("/", 1)[-1])[:48]
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem}-{digest}" + (f"-rg{row_group:05d}" if row_group >= 0 else "")


@dataclasses.dataclass(frozen=True)
class FileFacts:
    """What a file's header or footer says before it is read; None where the format can't tell.

    num_rows: records in the file (for the progress ETA); columns: field name -> Arrow type
    (for the output types of kept fields, and to refuse a missing column before the job runs).
    """

    num_rows: int | None = None
    columns: dict[str, pa.DataType] | None = None


def whole_file(path: str, name: str) -> Iterator[WorkItem | SourceRecord]:
    """The plan of a format read file by file: one work item per file."""
    yield WorkItem(path, name)


def no_facts(path: str) -> FileFacts:
    return FileFacts()


@dataclasses.dataclass(frozen=True)
class Format:
    """A registry entry: how to recognise, plan and read one input format.

    name: the `--input-format` value; suffixes: lower-case file name endings that select it.
    plan(path, name): the file's work items, or error SourceRecords for a file that cannot be
      planned (e.g. an unreadable footer); read(item): the SourceRecords of one work item;
      facts(path): what the file's header says without reading it (may raise on a bad file).
    columns_required: whether a field missing from `facts().columns` is refused before the job
      starts (CSV/TSV, where it almost always means the wrong delimiter), rather than reported
      record by record.
    """

    name: str
    suffixes: tuple[str, ...]
    read: Callable[[WorkItem], Iterator[SourceRecord]]
    plan: Callable[[str, str], Iterator[WorkItem | SourceRecord]] = whole_file
    facts: Callable[[str], FileFacts] = no_facts
    columns_required: bool = False


def one_line(e: BaseException) -> str:
    """`Type: message` on one printable line (error reports are JSON lines read by people)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def open_raw(path: str) -> IO[bytes]:
    """Open any Beam filesystem path as raw bytes (no decompression by name)."""
    # Imported here: the registry is read by the CLI and the job config, which must not pay
    # Beam's import (a second) for `--help` or a bad option.
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def open_binary(path: str) -> tuple[IO[bytes], IO[bytes]]:
    """Open `path` as a binary stream, gunzipping when the content is gzip: (stream, handle).

    Gzip is detected from the magic bytes, not the name, so a gzip file with a plain name still
    reads. Decompression uses the stdlib `gzip` module rather than Beam's CompressionTypes.AUTO:
    Beam's CompressedFile (2.77) silently stops at a truncated gzip stream, returning the partial
    last line as if it were complete, while `gzip.GzipFile` raises EOFError, which we report.
    Close both the stream and the handle.
    """
    handle = open_raw(path)
    try:
        magic = handle.read(2)
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    OPEN[path] = handle
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=handle, mode="rb"), handle
    return handle, handle


# The raw handle of each file a reader is streaming, so progress can ask how far it got.
OPEN: dict[str, IO[bytes]] = {}


def position(path: str) -> int | None:
    """Bytes of `path` read so far by the reader streaming it, if one is."""
    handle = OPEN.get(path)
    try:
        return handle.tell() if handle is not None and not handle.closed else None
    except (OSError, ValueError):
        return None


def row_preview(row: dict) -> str:
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
