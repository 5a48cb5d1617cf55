"""JSON Lines (plain or gzip): one JSON object per line, read file by file."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipeline.formats.base import (
    CORRUPT_DATA_ERRORS,
    RAW_PREVIEW_CHARS,
    Format,
    SourceRecord,
    one_line,
    open_binary,
)


def parse_json_line(path: str, index: int, line: bytes) -> SourceRecord:
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
        stream, handle = open_binary(path)
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, -1, None, None, f"cannot open file: {one_line(e)}")
        return
    try:
        for line in stream:
            yield parse_json_line(path, index, line)
            index += 1
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(
            path, index, None, None, f"file unreadable from line {index} on: {one_line(e)}"
        )
    finally:
        stream.close()
        handle.close()


FORMAT = Format(
    name="jsonl",
    suffixes=(".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    read=lambda item: read_jsonl_file(item.path),
)
