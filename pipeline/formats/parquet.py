"""Parquet: planned into one work item per row group, so one file is read by many workers."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.parquet as pq

from pipeline.formats.base import (
    CORRUPT_DATA_ERRORS,
    FileFacts,
    Format,
    SourceRecord,
    WorkItem,
    one_line,
    open_raw,
    row_preview,
)

# Rows converted to Python objects at a time; bounds memory for row groups of large rows.
_BATCH_ROWS = 1024


def plan_parquet_file(path: str, name: str = "parquet") -> Iterator[WorkItem | SourceRecord]:
    """Read a Parquet footer and yield one `WorkItem` per row group with its first global row.

    A footer that cannot be read yields a single error SourceRecord with index -1 instead: the
    file's row count is unknowable then, so one record stands for all of its rows.
    """
    try:
        with open_raw(path) as f:
            metadata = pq.ParquetFile(f).metadata
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(path, -1, None, None, f"unreadable parquet footer: {one_line(e)}")
        return
    first = 0
    for i in range(metadata.num_row_groups):
        rows = metadata.row_group(i).num_rows
        yield WorkItem(path, name, i, first, rows)
        first += rows


def read_parquet_row_group(item: WorkItem) -> Iterator[SourceRecord]:
    """Yield one SourceRecord per row of one row group, indexed by file-global row number.

    If decoding fails part-way, the rows read so far are kept and one error record at the first
    unread row names the range of rows lost (the footer tells us how many there were).
    """
    index = item.first_row
    end = item.first_row + item.num_rows
    try:
        with open_raw(item.path) as f:
            batches = pq.ParquetFile(f).iter_batches(
                batch_size=_BATCH_ROWS, row_groups=[item.row_group], use_threads=False
            )
            for batch in batches:
                for row in batch.to_pylist():
                    yield SourceRecord(item.path, index, row, row_preview(row), None)
                    index += 1
    except CORRUPT_DATA_ERRORS as e:
        yield SourceRecord(
            item.path, index, None, None,
            f"unreadable parquet rows {index}..{end - 1} (row group {item.row_group}): "
            f"{one_line(e)}",
        )
        return
    if index != end:
        yield SourceRecord(
            item.path, index, None, None,
            f"parquet row group {item.row_group} has {index - item.first_row} rows, "
            f"footer says {item.num_rows}",
        )


def parquet_facts(path: str) -> FileFacts:
    """Row count and column types from the footer (raises on an unreadable one)."""
    with open_raw(path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        return FileFacts(pf.metadata.num_rows, {n: schema.field(n).type for n in schema.names})


FORMAT = Format(
    name="parquet",
    suffixes=(".parquet",),
    read=read_parquet_row_group,
    plan=plan_parquet_file,
    facts=parquet_facts,
)
