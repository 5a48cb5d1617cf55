"""Readers and writers on real files with the DirectRunner.

Each Beam pipeline costs a second or two, so one pipeline checks several inputs at once.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import zlib
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # not a test class
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from pipeline.formats import InputError, SourceRecord, detect_format
from pipeline.formats.parquet import plan_parquet_file, read_parquet_row_group
from pipeline.output import OutputExistsError, errors_path, prepare_output
from pipeline.read import ReadRecords, check_input
from pipeline.writers import WriteErrors, WriteJsonl, WriteParquet, read_output, to_json_line

LONG_TEXT = "x" * 1_000_000

# (raw bytes of one line without its newline, expected value, expected error prefix)
JSONL_CASES: list[tuple[bytes, dict | None, str | None]] = [
    (b'{"text": "hello", "n": 1}', {"text": "hello", "n": 1}, None),
    (b'{"text": "unterminated', None, "invalid JSON"),
    (b"[1, 2, 3]", None, "JSON value is not an object (got list)"),
    (b"42", None, "JSON value is not an object (got int)"),
    (b"  \t ", None, "blank line"),
    (b'{"text": "caf\xe9"}', None, "invalid UTF-8 at byte 13"),
    ('{"text": "a\u2028b\u2029c"}'.encode(), {"text": "a\u2028b\u2029c"}, None),
    (json.dumps({"text": LONG_TEXT}).encode(), {"text": LONG_TEXT}, None),
    (b'{"text": "crlf"}\r', {"text": "crlf"}, None),
    (b'{"text": null}', {"text": None}, None),  # last line, no trailing newline
]


def _jsonl_bytes() -> bytes:
    return b"\n".join(line for line, _, _ in JSONL_CASES)


def _expected_jsonl(path: str) -> list[tuple]:
    return [(path, i, value, kind) for i, (_, value, kind) in enumerate(JSONL_CASES)]


def records_like(expected: list[tuple]):
    """An assert_that matcher: records equal to (source, index, value, error prefix) tuples.

    Errors are compared by prefix since what follows is often Python's own wording; failures
    print shortened values (one test line holds 1 MB).
    """

    def short(x: object) -> str:
        text = repr(x)
        return text if len(text) < 200 else text[:200] + "..."

    def check(actual: list[SourceRecord]) -> None:
        want = {(source, index): (value, error) for source, index, value, error in expected}
        got = {(r.source, r.index): r for r in actual}
        assert len(got) == len(actual), "duplicate (source, index) pairs"
        problems = [f"missing {key}" for key in want.keys() - got.keys()]
        problems += [f"unexpected {short(got[key])}" for key in got.keys() - want.keys()]
        for key in want.keys() & got.keys():
            value, error = want[key]
            record = got[key]
            if record.value != value or (error is None) != (record.error is None):
                problems.append(f"{key}: got {short(record)}")
            elif error is not None and not record.error.startswith(error):
                problems.append(f"{key}: error {record.error!r} does not start with {error!r}")
        if problems:
            raise BeamAssertException("; ".join(sorted(problems)[:20]))

    return check


def _write_parquet(path: Path, ids: range, row_group_size: int) -> list[dict]:
    rows = [{"id": i, "text": f"row {i}", "vec": [float(i), 0.5]} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return rows


def _counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in counters)


def test_read_jsonl_plain_gzip_and_truncated_gzip(tmp_path: Path) -> None:
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(_jsonl_bytes())
    gz = tmp_path / "b.json.gz"
    gz.write_bytes(gzip.compress(_jsonl_bytes()))

    # A gzip stream cut in half: the complete lines before the cut survive, then one error.
    rng = random.Random(0)
    lines = [json.dumps({"text": "".join(rng.choices("abcdef ", k=300))}) for _ in range(500)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    truncated = whole[: len(whole) // 2]
    complete = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(truncated).count(b"\n")
    assert 0 < complete < len(lines)
    cut = tmp_path / "sub" / "cut.jsonl.gz"
    cut.parent.mkdir()
    cut.write_bytes(truncated)

    disguised = tmp_path / "c.jsonl"  # gzip content under a plain name: sniffed, still read
    disguised.write_bytes(gzip.compress(_jsonl_bytes()))
    (tmp_path / "notes.txt").write_text("matched by the glob, unknown format")

    expected = [_expected_jsonl(str(f)) for f in (plain, gz, disguised)]
    expected = [row for rows in expected for row in rows]
    expected.append((str(tmp_path / "notes.txt"), -1, None, "cannot tell the format of"))
    expected_cut = [(str(cut), i, json.loads(lines[i]), None) for i in range(complete)]
    expected_cut.append((str(cut), complete, None, f"file unreadable from line {complete} on"))

    p = BeamTestPipeline()
    records = p | "ReadGlob" >> ReadRecords(str(tmp_path / "*"))
    assert_that(records, records_like(expected), label="CheckGlob")
    raws = records | "Raw" >> beam.Map(lambda r: (r.index, len(r.raw or "")))
    long_raw = raws | "Long" >> beam.Filter(lambda x: x[0] == 7)
    assert_that(long_raw, equal_to([(7, 1000)] * 3), label="CheckRawTruncated")
    cut_records = p | "ReadCut" >> ReadRecords(str(cut))
    assert_that(cut_records, records_like(expected_cut), label="CheckCut")
    result = p.run()
    result.wait_until_finish()

    total = 3 * len(JSONL_CASES) + 1 + complete + 1
    errors = 3 * sum(kind is not None for _, _, kind in JSONL_CASES) + 1 + 1
    assert _counter(result, "records_read") + _counter(result, "read_errors") == total
    assert _counter(result, "read_errors") == errors


def test_read_parquet_row_groups_and_corrupt_footer(tmp_path: Path) -> None:
    a = _write_parquet(tmp_path / "a.parquet", range(10), row_group_size=3)  # 4 row groups
    b = _write_parquet(tmp_path / "b.parquet", range(100, 105), row_group_size=2)  # 3 groups
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp_path / "empty.parquet").write_bytes(b"")
    other = tmp_path / "rows.bin"  # explicit input_format, no telling extension
    c = _write_parquet(other, range(3), row_group_size=10)

    expected = [(str(tmp_path / "a.parquet"), i, row, None) for i, row in enumerate(a)]
    expected += [(str(tmp_path / "b.parquet"), i, row, None) for i, row in enumerate(b)]
    expected += [
        (str(tmp_path / "bad.parquet"), -1, None, "unreadable parquet footer"),
        (str(tmp_path / "empty.parquet"), -1, None, "unreadable parquet footer"),
    ]
    p = BeamTestPipeline()
    records = p | "ReadGlob" >> ReadRecords(str(tmp_path / "*.parquet"))
    assert_that(records, records_like(expected), label="CheckGlob")
    explicit = p | "ReadExplicit" >> ReadRecords(str(other), input_format="parquet")
    assert_that(
        explicit,
        records_like([(str(other), i, row, None) for i, row in enumerate(c)]),
        label="CheckExplicit",
    )
    raws = records | "Raw" >> beam.Filter(lambda r: r.index == 0 and r.error is None)
    assert_that(
        raws | "RawOf" >> beam.Map(lambda r: json.loads(r.raw)),
        equal_to([a[0], b[0]]),
        label="CheckRaw",
    )
    result = p.run()
    result.wait_until_finish()
    assert _counter(result, "records_read") == 10 + 5 + 3
    assert _counter(result, "read_errors") == 2


def test_corrupt_row_group_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    _write_parquet(path, range(10), row_group_size=4)  # rows 0-3, 4-7, 8-9
    page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[page : page + 12] = b"\xff" * 12  # breaks the page header of row group 1
    path.write_bytes(bytes(data))

    shards = list(plan_parquet_file(str(path)))
    assert [(s.row_group, s.first_row, s.num_rows) for s in shards] == [
        (0, 0, 4),
        (1, 4, 4),
        (2, 8, 2),
    ]
    records = [r for shard in shards for r in read_parquet_row_group(shard)]
    assert [r.index for r in records] == [0, 1, 2, 3, 4, 8, 9]
    assert records[4].error.startswith("unreadable parquet rows 4..7 (row group 1)")
    assert all(r.error is None for i, r in enumerate(records) if i != 4)


def test_detect_format() -> None:
    assert detect_format("gs://b/x.parquet") == "parquet"
    for name in ("a.jsonl", "a.json", "a.jsonl.gz", "a.JSON.GZ"):
        assert detect_format(name) == "jsonl"
    assert detect_format("a.txt", "jsonl") == "jsonl"
    with pytest.raises(InputError, match="pass an input format"):
        detect_format("a.xml")
    with pytest.raises(InputError, match="unknown input format"):
        detect_format("a.jsonl", "xml")
    with pytest.raises(InputError):
        ReadRecords("a.jsonl", input_format="xml")


def test_check_input(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "a.parquet").write_bytes(b"x")
    assert check_input(str(tmp_path / "*")) == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.jsonl"),
    ]
    with pytest.raises(InputError, match="no input files match"):
        check_input(str(tmp_path / "*.json.gz"))
    with pytest.raises(InputError, match="no input files match"):
        check_input(str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="cannot tell the format"):
        check_input(str(tmp_path / "*"))
    assert len(check_input(str(tmp_path / "*"), input_format="jsonl")) == 3
    with pytest.raises(InputError, match="cannot open input file") as err:
        check_input(str(tmp_path), input_format="jsonl")  # a directory matches but won't open
    assert "\n" not in str(err.value)


def test_prepare_output(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    prepare_output(out, overwrite=False)  # nothing there yet
    assert errors_path(out) == out + "-errors"
    assert errors_path(out + "/") == out + "-errors"

    os.makedirs(out + "/.temp-beam-123")
    Path(out, ".temp-beam-123", "junk").write_text("x")
    os.makedirs(errors_path(out))
    Path(errors_path(out), "part-00000-of-00001.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(out, overwrite=False)
    Path(out, "part-00000-of-00002.parquet").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(out, overwrite=False)
    prepare_output(out, overwrite=True)
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []
    prepare_output(out, overwrite=False)


RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("total", pa.float64()),
        ("ok", pa.bool_()),
    ]
)


def test_writers_round_trip(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    prepare_output(out, overwrite=False)
    rows = [
        {
            "id": f"r{i}",
            "tokens": np.arange(i, dtype=np.int32),
            "logprobs": np.full(i, -0.5, dtype=np.float32),
            "total": np.float64(-0.5 * i),
            "ok": bool(i % 2),
        }
        for i in range(5)
    ]
    rows.append({"id": "nan", "tokens": [], "logprobs": [], "total": float("nan"), "ok": False})
    rows.append({"id": "none", "tokens": [1], "logprobs": [0.25], "ok": True})  # no "total"
    errors = [
        SourceRecord("in.jsonl", 3, None, '{"text": "a\u2028b"', "invalid JSON: x"),
        {"id": "e1", "error": "too long", "score": np.float32(np.inf), "ids": np.array([1, 2])},
    ]
    jsonl_rows = [{"a": np.int64(1), "b": [np.float32(0.5), float("nan")], "c": "é\u2028"}]

    p = BeamTestPipeline()
    _ = p | "Rows" >> beam.Create(rows) | "WriteRows" >> WriteParquet(out, RESULT_SCHEMA)
    _ = p | "Errors" >> beam.Create(errors) | "WriteErrs" >> WriteErrors(out)
    _ = p | "Jsonl" >> beam.Create(jsonl_rows) | "WriteJsonl" >> WriteJsonl(str(tmp_path / "j"))
    p.run().wait_until_finish()

    got = sorted(read_output(out), key=lambda r: r["id"])
    assert pq.read_schema(next(Path(out).glob("part-*.parquet"))).equals(RESULT_SCHEMA)
    by_id = {r["id"]: r for r in got}
    assert len(got) == len(rows)
    for i in range(5):
        assert by_id[f"r{i}"] == {
            "id": f"r{i}",
            "tokens": list(range(i)),
            "logprobs": [-0.5] * i,
            "total": -0.5 * i,
            "ok": bool(i % 2),
        }
    assert math.isnan(by_id["nan"]["total"])
    assert by_id["none"]["total"] is None

    assert sorted(read_output(errors_path(out)), key=str) == sorted(
        [
            {
                "source": "in.jsonl",
                "index": 3,
                "value": None,
                "raw": '{"text": "a\u2028b"',
                "error": "invalid JSON: x",
            },
            {"id": "e1", "error": "too long", "score": None, "ids": [1, 2]},
        ],
        key=str,
    )
    assert read_output(str(tmp_path / "j")) == [{"a": 1, "b": [0.5, None], "c": "é\u2028"}]
    # The output is not ASCII-escaped, and one row is one physical line despite U+2028.
    text = next(Path(tmp_path / "j").glob("part-*.jsonl")).read_text(encoding="utf-8")
    assert text.count("\n") == 1 and "é\u2028" in text


def test_zero_rows_write_empty_shards_that_read_back(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    empty_input = tmp_path / "empty.jsonl"
    empty_input.write_bytes(b"")
    p = BeamTestPipeline()
    records = p | "Read" >> ReadRecords(str(empty_input))
    assert_that(records, equal_to([]))
    rows = (
        records | "Values" >> beam.Filter(lambda r: r.error is None) | beam.Map(lambda r: r.value)
    )
    _ = rows | "WriteRows" >> WriteParquet(out, RESULT_SCHEMA)
    _ = records | "Errs" >> beam.Filter(lambda r: r.error is not None) | WriteErrors(out)
    p.run().wait_until_finish()

    # Beam still writes one shard: a valid Parquet file with the schema and no rows.
    shards = sorted(Path(out).glob("part-*"))
    assert [s.name for s in shards] == ["part-00000-of-00001.parquet"]
    assert pq.read_schema(shards[0]).equals(RESULT_SCHEMA)
    assert read_output(out) == []
    assert read_output(errors_path(out)) == []
    # ... and our reader takes such a file as zero rows, not as an error.
    assert list(plan_parquet_file(str(shards[0]))) == []
    with pytest.raises(InputError, match="no output shards"):
        read_output(str(tmp_path / "nothing"))


def test_to_json_line() -> None:
    line = to_json_line(
        {"x": np.float32(np.nan), "y": (1, np.int8(2)), "z": b"\xff", "w": -math.inf}
    )
    assert json.loads(line) == {"x": None, "y": [1, 2], "z": "\\xff", "w": None}
    with pytest.raises(TypeError):
        to_json_line({"x": object()})
