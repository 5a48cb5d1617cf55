"""CSV and TSV (plain or gzip): a header row names the columns, every value is a string.

Parsed with the stdlib `csv` module in strict mode, fed one decoded line at a time, so quoted
fields may hold delimiters, quotes ("") and newlines, and one malformed row costs one error
record: the reader resumes at the next line. Records are numbered by data row (the header is
not counted), the same numbering a JSONL file of the same records has; error reasons name the
file line where the row starts, as an editor shows it.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator

import pyarrow as pa

from pipeline.formats.base import (
    CORRUPT_DATA_ERRORS,
    RAW_PREVIEW_CHARS,
    FileFacts,
    Format,
    SourceRecord,
    WorkItem,
    one_line,
    open_binary,
)

# The csv module refuses fields over 128 KiB by default; a document of a pretraining corpus
# can be megabytes. The limit is process-wide state of the csv module, raised once here.
_FIELD_LIMIT = 1 << 30
if csv.field_size_limit() < _FIELD_LIMIT:
    csv.field_size_limit(_FIELD_LIMIT)


class _Lines:
    """Decoded lines for csv.reader, remembering the current row's text and bad UTF-8 lines."""

    def __init__(self, stream):
        self.stream = stream
        self.number = 0  # lines handed out so far
        self.row_text: list[str] = []  # lines of the row being parsed
        self.bad_lines: list[int] = []  # lines of the row being parsed that were not UTF-8

    def __iter__(self) -> Iterator[str]:
        for line in self.stream:
            self.number += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self.bad_lines.append(self.number)
                text = line.decode("utf-8", "replace")
            if self.number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte-order mark (Excel writes one)
            if sum(map(len, self.row_text)) < RAW_PREVIEW_CHARS:
                self.row_text.append(text)
            yield text

    def take_row(self) -> tuple[str, list[int]]:
        """The raw text and the non-UTF-8 lines of the row just parsed; starts the next row."""
        raw, bad = "".join(self.row_text)[:RAW_PREVIEW_CHARS].rstrip("\r\n"), self.bad_lines
        self.row_text, self.bad_lines = [], []
        return raw, bad


def _header_problem(header: list[str]) -> str | None:
    if not header or header == [""]:
        return "the header row is empty"
    seen: set[str] = set()
    for name in header:
        if name in seen:
            return f"the header names column {name!r} twice"
        seen.add(name)
    return None


def read_delimited(item: WorkItem, delimiter: str) -> Iterator[SourceRecord]:
    """Yield one SourceRecord per data row of a CSV/TSV file (plain or gzip), streaming."""
    path = item.path
    try:
        stream, handle = open_binary(path)
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, -1, None, None, f"cannot open file: {one_line(e)}")
        return
    lines = _Lines(stream)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_problem: str | None = None
    index, first_line = 0, 1
    try:
        while True:
            try:
                fields = next(reader)
                error = None
            except StopIteration:
                break
            except csv.Error as e:
                fields, error = None, f"malformed row at line {first_line}: {e}"
                if "end of data" in str(e):
                    error += " (a quoted field is never closed)"
            raw, bad = lines.take_row()
            if header is None:
                if error is not None or bad:
                    header_problem = error or f"invalid UTF-8 in the header row (line {bad[0]})"
                    header = []
                else:
                    header, header_problem = fields, _header_problem(fields)
            else:
                if error is None:
                    error = _row_problem(fields, header, header_problem, bad, first_line)
                value = None if error else dict(zip(header, fields, strict=True))
                yield SourceRecord(path, index, value, raw, error)
                index += 1
            first_line = lines.number + 1
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, index, None, None,
                           f"file unreadable from line {first_line} on: {one_line(e)}")
    finally:
        stream.close()
        handle.close()


def _row_problem(fields: list[str], header: list[str], header_problem: str | None,
                 bad: list[int], line: int) -> str | None:
    if header_problem:
        return f"{header_problem}, so row at line {line} has no column names"
    if bad:
        return f"invalid UTF-8 at line {bad[0]}"
    if not fields:
        return f"blank line {line}"
    if len(fields) != len(header):
        return (f"row at line {line} has {len(fields)} fields, the header has {len(header)}")
    return None


def delimited_facts(path: str, delimiter: str) -> FileFacts:
    """The header's column names (all strings); none (an empty mapping) for an empty file or a
    header the reader will report as broken."""
    stream, handle = open_binary(path)
    try:
        reader = csv.reader(_Lines(stream), delimiter=delimiter, strict=True)
        header = next(reader, None)
    except (csv.Error, *CORRUPT_DATA_ERRORS):
        return FileFacts(None, {})  # the reader reports it, row by row
    finally:
        stream.close()
        handle.close()
    if header is None or _header_problem(header):
        return FileFacts(None, {})
    return FileFacts(None, {name: pa.string() for name in header})


def delimited_format(name: str, delimiter: str, suffixes: tuple[str, ...]) -> Format:
    return Format(
        name=name,
        suffixes=suffixes,
        read=functools.partial(read_delimited, delimiter=delimiter),
        facts=functools.partial(delimited_facts, delimiter=delimiter),
        columns_required=True,
    )


CSV = delimited_format("csv", ",", (".csv", ".csv.gz"))
TSV = delimited_format("tsv", "\t", (".tsv", ".tsv.gz", ".tab"))
