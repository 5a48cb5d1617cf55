"""Input formats as a registry: one module per format, one `Format` entry each.

Adding a format is a module with a `read` function (and, if it can be split or has a header, a
`plan` and `facts`) plus one line in `FORMATS` below; the CLI's `--input-format` choices, the
job config's validation and format detection all come from this registry.
"""

from __future__ import annotations

from pipeline.formats import delimited, jsonl, parquet
from pipeline.formats.base import (
    CORRUPT_DATA_ERRORS,
    RAW_PREVIEW_CHARS,
    FileFacts,
    Format,
    InputError,
    SourceRecord,
    WorkItem,
    one_line,
)

FORMATS: dict[str, Format] = {f.name: f for f in (
    jsonl.FORMAT,
    parquet.FORMAT,
    delimited.CSV,
    delimited.TSV,
)}


def names() -> tuple[str, ...]:
    """The `--input-format` values, in registry order."""
    return tuple(FORMATS)


def get(name: str) -> Format:
    """The registry entry of `name`, or InputError naming the known formats."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(
            f"unknown input format {name!r}; expected one of {', '.join(FORMATS)}") from None


def detect_format(path: str, input_format: str | None = None) -> str:
    """The format name of `path`: the explicit `input_format` wins over the file name's suffix.

    Raises InputError for an unknown `input_format`, or for an unknown suffix when no format
    was given, so the CLI can reject the job before any work starts.
    """
    if input_format is not None:
        return get(input_format).name
    lower = path.lower()
    # Longest suffix first, so ".jsonl.gz" is never taken for another format's ".gz".
    by_length = sorted(((s, f.name) for f in FORMATS.values() for s in f.suffixes),
                       key=lambda pair: -len(pair[0]))
    for suffix, name in by_length:
        if lower.endswith(suffix):
            return name
    known = ", ".join(s for f in FORMATS.values() for s in f.suffixes)
    raise InputError(f"cannot tell the format of {path!r} from its extension "
                     f"(known: {known}); pass an input format")


__all__ = [
    "CORRUPT_DATA_ERRORS",
    "FORMATS",
    "RAW_PREVIEW_CHARS",
    "FileFacts",
    "Format",
    "InputError",
    "SourceRecord",
    "WorkItem",
    "detect_format",
    "get",
    "names",
    "one_line",
]
