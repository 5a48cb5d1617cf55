"""A validated input record, what every work item carries of it, and the errors output's row."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

RAW_LIMIT = 1000


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


def default_id(source: str, index: int) -> str:
    """Stable id from the file name and line/row number, so reruns give the same ids."""
    return f"{os.path.basename(source)}:{index}"


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated input record; `key` is unique per input row (source:index), `id` is theirs.

    text: the text to score (the continuation, with a context), the prompt, or for multiple
    choice the shared context; choices/label: multiple choice only.
    """

    key: str
    id: str
    text: str
    context: str | None
    keep: dict[str, Any]
    source: str
    index: int
    choices: tuple[str, ...] | None = None
    label: int | None = None
    original: dict[str, Any] | None = None  # filter: the whole input record, written back

    def error(self, reason: str, raw: Any = None) -> dict:
        """This record's row for the errors output."""
        return error_row(self.source, self.index, self.id, reason,
                         self.text if raw is None else raw)


@dataclasses.dataclass(frozen=True)
class RecordInfo:
    """What a work item carries of its record to the output row: id, origin, kept fields.

    Modes extend it with what their row builder needs (e.g. the token ids of a scored text).
    """

    id: str
    source: str
    index: int
    keep: dict[str, Any]

    @classmethod
    def of(cls, rec: Record, **extra: Any) -> RecordInfo:
        return cls(id=rec.id, source=rec.source, index=rec.index, keep=rec.keep, **extra)


# Tags of the steps' side outputs.
ERRORS = "errors"  # error rows (see error_row)
EMPTY = "empty"  # score: records with nothing to score, kept as rows with --allow-empty


def with_kept_fields(fields: list, keep_fields: tuple[str, ...],
                     keep_types: dict | None = None) -> Any:
    """A mode's output fields plus the kept input fields: an Arrow schema.

    A kept field's type is the input's (Parquet, CSV) where known, else string (JSON text).
    """
    import pyarrow as pa

    fields = list(fields)
    taken = {f.name for f in fields}
    for name in keep_fields:
        if name in taken:
            raise ValueError(f"--keep-fields {name!r} clashes with an output column")
        fields.append(pa.field(name, (keep_types or {}).get(name, pa.string())))
    return pa.schema(fields)
