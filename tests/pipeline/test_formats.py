"""The input-format registry and the CSV/TSV reader, on real files.

Reader tests call the format's `read` directly (the same function the Beam step calls); the job
tests at the end run real score jobs on the DirectRunner and compare CSV/TSV input with the same
records given as JSONL.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import click
import pyarrow as pa
import pytest

from pipeline import formats
from pipeline.formats import InputError, WorkItem, detect_format
from pipeline.read import input_facts

TEXTS = [
    "The Manhattan Bridge is a suspension bridge.",
    'She said "hello, world" and left.',
    "line one\nline two, with a comma\n\nline four",
    "tab\tinside and a trailing space ",
    "naïve café ☕ — ünïcödé",
]


def _read(path: Path, name: str | None = None) -> list:
    fmt = formats.get(name or detect_format(str(path)))
    items = list(fmt.plan(str(path), fmt.name))
    return [r for item in items for r in fmt.read(item)]


def _write_delimited(path: Path, rows: list[list[str]], delimiter: str = ",") -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# --- registry --------------------------------------------------------------------------------

def test_registry_names_suffixes_and_detection():
    assert formats.names() == ("jsonl", "parquet", "csv", "tsv")
    for path, name in [("a.csv", "csv"), ("a.CSV.GZ", "csv"), ("b.tsv", "tsv"),
                       ("b.tsv.gz", "tsv"), ("c.tab", "tsv"), ("d.jsonl.gz", "jsonl"),
                       ("e.parquet", "parquet")]:
        assert detect_format(path) == name, path
    assert detect_format("notes.txt", "csv") == "csv"
    with pytest.raises(InputError, match="expected one of jsonl, parquet, csv, tsv"):
        formats.get("xml")


def test_the_cli_and_the_config_take_their_choices_from_the_registry():
    from pipeline import cli
    from pipeline.config import JobConfig

    (option,) = [p for p in cli.main.commands["score"].params if p.name == "input_format"]
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == formats.names()
    assert JobConfig(input_format="tsv").input_format == "tsv"
    with pytest.raises(ValueError, match="input_format must be one of"):
        JobConfig(input_format="xml")


# --- the CSV/TSV reader ----------------------------------------------------------------------

@pytest.mark.parametrize("name, delimiter", [("a.csv", ","), ("a.tsv", "\t"),
                                             ("a.csv.gz", ",")])
def test_good_file_with_quoted_multiline_fields(tmp_path, name, delimiter):
    path = tmp_path / name
    _write_delimited(path, [["id", "text"], *[[f"r{i}", t] for i, t in enumerate(TEXTS)]],
                     delimiter)
    records = _read(path)
    assert [r.error for r in records] == [None] * len(TEXTS)
    assert [r.index for r in records] == list(range(len(TEXTS)))
    assert [r.value for r in records] == [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
    assert all(r.source == str(path) for r in records)
    assert "hello, world" in records[1].raw


def test_bom_is_not_part_of_the_first_column_name(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,n\r\nhello,1\r\n".encode())
    (record,) = _read(path)
    assert record.value == {"text": "hello", "n": "1"}
    assert input_facts([str(path)], None, ["text"])[1] == {"text": pa.string(), "n": pa.string()}


def test_ragged_rows_are_error_rows_with_their_line_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "ragged.csv"
    # line 1 header; row 0 spans lines 2-3; row 1 too few fields (line 4); row 2 too many (5)
    path.write_text('text,n\n"two\nlines",1\nshort\nx,2,extra\nlast,3\n')
    records = _read(path)
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert records[0].value == {"text": "two\nlines", "n": "1"}
    assert records[1].error == "row at line 4 has 1 fields, the header has 2"
    assert records[1].raw == "short"
    assert records[2].error == "row at line 5 has 3 fields, the header has 2"
    assert records[3].value == {"text": "last", "n": "3"}


def test_malformed_quoting_costs_one_row_and_an_unclosed_quote_is_named(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_text('text,n\n"bad"quote,1\nfine,2\n"never closed,3\nswallowed,4\n')
    records = _read(path)
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].error.startswith("malformed row at line 2:")
    assert records[1].value == {"text": "fine", "n": "2"}
    assert records[2].error.startswith("malformed row at line 4:")
    assert "never closed" in records[2].error


def test_invalid_utf8_and_blank_lines_are_error_rows_nul_is_data(tmp_path):
    path = tmp_path / "bytes.csv"
    path.write_bytes(b"text\nok\ncaf\xe9\n\nnul\x00here\nend\n")
    records = _read(path)
    # A NUL is a character like any other (JSON text may hold one as \u0000 too).
    assert [r.value for r in records] == [{"text": "ok"}, None, None, {"text": "nul\x00here"},
                                          {"text": "end"}]
    assert records[1].error == "invalid UTF-8 at line 3"
    assert records[2].error == "blank line 4"


def test_duplicate_header_names_make_every_row_an_error(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("text,text\na,b\nc,d\n")
    records = _read(path)
    assert len(records) == 2 and all(r.value is None for r in records)
    assert "names column 'text' twice" in records[0].error


def test_empty_and_header_only_files_have_no_records(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header = tmp_path / "header.tsv"
    header.write_text("text\tid\n")
    assert _read(empty) == [] and _read(header) == []
    # Nothing to refuse up front either: an empty shard is a valid shard.
    assert input_facts([str(empty), str(header)], None, ["text"])[0] is None


def test_a_field_larger_than_the_csv_modules_default_limit(tmp_path):
    path = tmp_path / "big.csv"
    text = "word " * 100_000  # 500 kB, past csv's 128 KiB default field limit
    _write_delimited(path, [["text"], [text]])
    (record,) = _read(path)
    assert record.value == {"text": text}


def test_truncated_gzip_keeps_the_rows_read_and_reports_the_rest(tmp_path):
    path = tmp_path / "cut.csv.gz"
    rows = [["text"], *[[f"row {i} " + "x" * 200] for i in range(400)]]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    whole = gzip.compress(buf.getvalue().encode())
    path.write_bytes(whole[: len(whole) // 2])
    records = _read(path)
    assert records[-1].error.startswith("file unreadable from line")
    assert all(r.error is None for r in records[:-1]) and len(records) > 2
    assert [r.index for r in records] == list(range(len(records)))


def test_wrong_delimiter_is_refused_before_the_job_with_a_hint(tmp_path):
    path = tmp_path / "really-tabs.csv"
    _write_delimited(path, [["id", "text"], ["1", "hello"]], "\t")
    with pytest.raises(InputError, match=r"has no column 'text'.*is the delimiter right"):
        input_facts([str(path)], None, ["text"])
    # Read as TSV, the same file is fine.
    assert input_facts([str(path)], "tsv", ["text"])[1].keys() == {"id", "text"}


def test_work_items_of_a_csv_file_are_whole_files(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text\nx\n")
    assert list(formats.get("csv").plan(str(path), "csv")) == [WorkItem(str(path), "csv")]


# --- end to end: CSV/TSV records score as the same records in JSONL --------------------------

def _job(tmp_path: Path, ck: Path, name: str, path: Path, **extra):
    from pipeline import jobs
    from pipeline.config import JobConfig
    from pipeline.writers import read_output

    config = JobConfig(input=str(path), output=str(tmp_path / name), model=str(ck),
                       id_field="id", keep_fields=("label",), progress=False, **extra)
    summary = jobs.run(config)
    return summary, sorted(read_output(config.output), key=lambda r: r["id"])


def test_csv_and_tsv_scores_equal_jsonl(tmp_path, tiny_checkpoint):
    records = [{"id": f"r{i}", "text": t, "label": f"L{i % 2}"} for i, t in enumerate(TEXTS)]
    jsonl = tmp_path / "in" / "texts.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = [["id", "text", "label"], *[[r["id"], r["text"], r["label"]] for r in records]]
    as_csv, as_tsv = tmp_path / "in" / "texts.csv", tmp_path / "in" / "texts.tsv.gz"
    _write_delimited(as_csv, table)
    _write_delimited(as_tsv, table, "\t")

    _, want = _job(tmp_path, tiny_checkpoint, "from-jsonl", jsonl)
    for name, path in [("from-csv", as_csv), ("from-tsv", as_tsv)]:
        summary, got = _job(tmp_path, tiny_checkpoint, name, path)
        assert summary.reconciled and summary.result_records == len(records)
        assert got == want, name  # every column, scores included, exactly


def test_a_bad_csv_reconciles_and_names_its_lines(tmp_path, tiny_checkpoint):
    from pipeline.writers import read_output

    path = tmp_path / "bad.csv"
    path.write_text('id,text,label\na,hello there,x\nb,too,many,fields\nc,,z\nd,fine,w\n')
    summary, rows = _job(tmp_path, tiny_checkpoint, "bad", path)
    assert (summary.input_records, summary.result_records, summary.error_records) == (4, 2, 2)
    assert [r["id"] for r in rows] == ["a", "d"]
    errors = sorted(read_output(str(tmp_path / "bad-errors")), key=lambda e: e["line"])
    assert [(e["line"], e["reason"]) for e in errors] == [
        (1, "row at line 3 has 4 fields, the header has 3"),
        (2, "empty text in field 'text'"),
    ]


def test_a_parquet_value_python_cannot_hold_is_an_error_record_not_a_crash(tmp_path):
    """A duration of 2**62 ms (what a flipped byte made in the fuzz test) overflows Python's
    timedelta while the row is converted: the row group becomes one error record naming its
    rows, and the job goes on."""
    import pyarrow.parquet as pq

    from pipeline.formats.parquet import read_parquet_row_group

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text0": pa.array([0, 2**62], pa.duration("ms"))}), path)
    got = list(read_parquet_row_group(WorkItem(str(path), "parquet", 0, 0, 2)))
    assert len(got) == 1 and got[0].index == 0 and got[0].value is None
    assert "unreadable parquet rows 0..1" in got[0].error
