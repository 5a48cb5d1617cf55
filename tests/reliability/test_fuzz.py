"""Fuzzing the readers, the tokenizer and the checkpoint header parser with hypothesis.

A bounded number of examples in CI (seconds in all); RELIABILITY_EXAMPLES=N multiplies each
budget for a long run. Invariants:

- readers never raise: `parse_json_line` returns one record per line; `read_jsonl_file`
  yields exactly one record per b"\\n"-separated line (counted here from the bytes), indexed
  0..n-1, or for a broken gzip stream the lines read so far plus one error; `plan_parquet_file`
  + `read_parquet_row_group` yield one record per row the footer announces, or rows read plus
  one error naming the lost range, or a single whole-file error;
- the tokenizer raises nothing but ValueError on any text, and decode(encode(t)) == t for every
  valid (surrogate-free) text;
- a safetensors file with any header raises nothing but CheckpointError.

Crashes found by these and fixed are pinned by the regression tests at the end.
"""

from __future__ import annotations

import gzip
import io as pyio
import json
import math
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import examples

from gpt2model import CheckpointError
from gpt2model.weights import read_safetensors
from pipeline.formats import SourceRecord, WorkItem
from pipeline.formats.delimited import read_delimited
from pipeline.formats.jsonl import parse_json_line, read_jsonl_file
from pipeline.formats.parquet import plan_parquet_file, read_parquet_row_group

# On demand (RELIABILITY_EXAMPLES=N), every budget below grows N/5 times.
SCALE = max(1, examples(5) // 5)


def fuzz(n: int):
    """Settings of a fuzz test: `n` examples in CI (times SCALE on demand), no deadline."""
    return settings(max_examples=n * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _lines(data: bytes) -> int:
    """b"\\n"-separated lines: a final piece counts only when not empty."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def _tmp_file(data: bytes, suffix: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    return f.name


def _check_record(rec: SourceRecord) -> None:
    assert isinstance(rec, SourceRecord)
    assert (rec.value is None) != (rec.error is None)
    assert rec.value is None or isinstance(rec.value, dict)
    assert rec.error is None or (isinstance(rec.error, str) and rec.error
                                 and "\n" not in rec.error)
    assert rec.raw is None or len(rec.raw) <= 1000


# --------------------------------------------------------------------------------------------
# JSONL.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)
# Lines that are JSON-ish (so the parser gets deep), mutated, or arbitrary bytes.
line_bytes = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False, allow_nan=True)
                    .encode("utf-8", "surrogatepass")),
    st.dictionaries(st.text(max_size=6), json_values, max_size=5).map(
        lambda v: json.dumps(v).encode()),
    st.tuples(st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=4),
              st.binary(min_size=1, max_size=4), st.integers(0, 10_000)).map(
        lambda t: (lambda b: b[:t[2] % (len(b) + 1)] + t[1] + b[t[2] % (len(b) + 1):])(
            json.dumps(t[0]).encode())),
    st.text().map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@fuzz(300)
@given(line=line_bytes, index=st.integers(0, 10))
def test_parse_json_line_never_raises(line, index):
    rec = parse_json_line("f.jsonl", index, line)
    _check_record(rec)
    assert (rec.source, rec.index) == ("f.jsonl", index)
    if rec.error is None:
        assert rec.value == json.loads(line.rstrip(b"\r\n").decode("utf-8").lstrip("\ufeff"))


file_bytes = st.lists(line_bytes, max_size=12).flatmap(
    lambda lines: st.tuples(st.just(lines), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
).map(lambda t: t[1].join(t[0]) + (t[1] if t[2] else b""))


@fuzz(100)
@given(data=st.one_of(file_bytes, st.binary(max_size=300)))
def test_read_jsonl_file_one_record_per_line(data):
    path = _tmp_file(data, ".jsonl")
    records = list(read_jsonl_file(path))
    for rec in records:
        _check_record(rec)
    if data[:2] == b"\x1f\x8b":  # the gzip magic: read as a (broken) gzip stream
        assert records and records[-1].error is not None
        return
    assert [r.index for r in records] == list(range(_lines(data)))


# CSV/TSV: arbitrary bytes, and CSV-ish text with quotes, delimiters and newlines mixed in.
csv_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"a", b"text", b",", b"\t", b'"', b'""', b"\n", b"\r\n", b"\xe9",
                              b"\xef\xbb\xbf", b"\x00", b" "]), max_size=60).map(b"".join),
)


@fuzz(150)
@given(data=csv_bytes, delimiter=st.sampled_from([",", "\t"]))
def test_read_delimited_never_raises_and_numbers_rows_densely(data, delimiter):
    path = _tmp_file(data, ".csv")
    records = list(read_delimited(WorkItem(path, "csv"), delimiter))
    for rec in records:
        _check_record(rec)
    assert [r.index for r in records] == list(range(len(records)))
    if data[:2] == b"\x1f\x8b":  # read as a (broken) gzip stream: one error at the break
        assert records and records[-1].error is not None
        return
    # Every line after the header belongs to at most one record: none is invented.
    assert len(records) <= max(0, _lines(data) - 1)


@fuzz(60)
@given(data=file_bytes, cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_read_gzip_jsonl_whole_or_truncated(data, cut):
    packed = gzip.compress(data, mtime=0)
    if cut is not None:
        packed = packed[:int(len(packed) * cut)]
    records = list(read_jsonl_file(_tmp_file(packed, ".jsonl.gz")))
    for rec in records:
        _check_record(rec)
    assert [r.index for r in records] == list(range(len(records)))
    if cut is None:
        assert len(records) == _lines(data)
        return
    if not packed:
        assert records == []  # an empty file: nothing to read, nothing lost
        return
    # What the stream held before it broke, then exactly one error for the rest.
    try:
        readable = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(packed)
    except zlib.error:
        readable = b""
    assert records[-1].error is not None
    assert len(records) - 1 <= readable.count(b"\n")


# --------------------------------------------------------------------------------------------
# Parquet.

ARROW_COLUMNS = st.sampled_from([
    (pa.string(), st.text()),
    (pa.large_string(), st.text(max_size=5)),
    (pa.binary(), st.binary(max_size=20)),
    (pa.int8(), st.integers(-128, 127)),
    (pa.uint64(), st.integers(0, 2**64 - 1)),
    (pa.float64(), st.floats()),
    (pa.float32(), st.floats(width=32)),
    (pa.bool_(), st.booleans()),
    (pa.decimal128(10, 3), st.decimals(-10**6, 10**6, places=3, allow_nan=False)),
    (pa.date32(), st.dates()),
    (pa.timestamp("us", tz="UTC"), st.datetimes(timezones=st.just(
        __import__("datetime").timezone.utc))),
    (pa.duration("ms"), st.timedeltas(max_value=__import__("datetime").timedelta(days=999))),
    (pa.list_(pa.string()), st.lists(st.text(max_size=5), max_size=3)),
    (pa.struct([("a", pa.int32()), ("b", pa.string())]),
     st.fixed_dictionaries({"a": st.integers(-5, 5), "b": st.text(max_size=3)})),
    (pa.map_(pa.string(), pa.int64()),
     st.lists(st.tuples(st.text(max_size=3), st.integers(-9, 9)), max_size=2)),
    (pa.null(), st.none()),
])


@st.composite
def parquet_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 12))
    columns = {}
    for i in range(draw(st.integers(1, 4))):
        typ, values = draw(ARROW_COLUMNS)
        name = draw(st.sampled_from(["text", "id", f"c{i}", "ü", ""]))
        columns[name + str(i)] = pa.array(
            [draw(st.none() | values) for _ in range(n)], typ)
    if draw(st.booleans()):
        columns["text"] = pa.array([draw(st.none() | st.text()) for _ in range(n)], pa.string())
    if draw(st.booleans()):  # dictionary-encoded strings
        columns["dict"] = pa.array([draw(st.sampled_from(["a", "b", None])) for _ in range(n)],
                                   pa.string()).dictionary_encode()
    return pa.table(columns)


def _read_all(path: str) -> tuple[list[SourceRecord], int | None]:
    """Every record of a Parquet file through the two reader steps; (records, rows announced)."""
    records, announced = [], 0
    for item in plan_parquet_file(path):
        if isinstance(item, SourceRecord):
            assert item.index == -1 and item.error
            records.append(item)
            return records, None
        assert isinstance(item, WorkItem)
        assert item.first_row == announced
        announced += item.num_rows
        got = list(read_parquet_row_group(item))
        indices = [r.index for r in got]
        assert indices == list(range(item.first_row, item.first_row + len(got)))
        bad = [r for r in got if r.error is not None]
        # All rows, or the rows read plus one error for the rest (never more, never fewer).
        assert (not bad and len(got) == item.num_rows) or (bad == got[-1:]
                                                          and len(got) <= item.num_rows + 1)
        if bad:  # it names the rows it stands for: from its index to the group's end
            end = item.first_row + item.num_rows - 1
            assert f"rows {bad[0].index}..{end} " in bad[0].error or "footer says" in bad[0].error
        records += got
    return records, announced


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@fuzz(40)
@given(table=parquet_tables(), group=st.integers(1, 5))
def test_parquet_rows_of_any_schema(table, group):
    sink = pyio.BytesIO()
    pq.write_table(table, sink, row_group_size=group)
    records, announced = _read_all(_tmp_file(sink.getvalue(), ".parquet"))
    assert announced == table.num_rows == len(records)
    for rec, row in zip(records, table.to_pylist(), strict=True):
        _check_record(rec)
        assert _same(rec.value, row)


@fuzz(60)
@given(table=parquet_tables(), group=st.integers(1, 5), data=st.data())
def test_damaged_parquet_never_raises(table, group, data):
    sink = pyio.BytesIO()
    pq.write_table(table, sink, row_group_size=group, compression=data.draw(
        st.sampled_from(["none", "snappy", "zstd"])))
    raw = bytearray(sink.getvalue())
    how = data.draw(st.sampled_from(["flip", "cut", "zero"]))
    if how == "flip":  # damage bytes anywhere, data pages and footer alike
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        at = data.draw(st.integers(4, max(4, len(raw) - 9)))
        raw[at:at + data.draw(st.integers(1, 64))] = b"\0" * 8
    records, announced = _read_all(_tmp_file(bytes(raw), ".parquet"))
    for rec in records:
        _check_record(rec)
    if announced is None:
        assert len(records) == 1
    else:
        assert len(records) == announced or any(r.error for r in records)


# --------------------------------------------------------------------------------------------
# Tokenizer.


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from gpt2model import get_tokenizer

    return get_tokenizer(str(tiny_checkpoint))


any_text = st.one_of(
    st.text(),
    st.text(st.characters(codec="utf-8")),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x20)),
    st.lists(st.sampled_from(["<|endoftext|>", "<|", "|>", " ", "\n", "\r\n", "'s", "’",
                              "\u200d", "\ufe0f", "\U0001f469", "é", "e\u0301", "\ufffd"]),
             max_size=12).map("".join),
    st.text(st.characters(categories=("Cs", "Co", "Cn", "Mn"))),
)


@fuzz(400)
@given(text=any_text)
def test_tokenizer_round_trip_or_value_error(tokenizer, text):
    try:
        ids = tokenizer.encode(text)
    except ValueError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)  # only surrogates are refused
        return
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert (len(ids) == 0) == (text == "")
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


@fuzz(200)
@given(ids=st.lists(st.integers(0, 2**32 - 1), max_size=30)
       | st.lists(st.integers(-5, 60000), max_size=10)
       | st.lists(st.floats() | st.booleans(), min_size=1, max_size=3))
def test_tokenizer_decode_any_ids(tokenizer, ids):
    try:
        text = tokenizer.decode(ids)
    except ValueError:
        assert any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 50257
                   for i in ids)
        return
    assert isinstance(text, str)


def test_tokenizer_decode_out_of_vocabulary_id(tokenizer):
    """Regression: 2**32 raised OverflowError from Rust; 50257 silently vanished."""
    for bad in (2**32, 50257, 60000):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([464, bad])


# --------------------------------------------------------------------------------------------
# Checkpoint headers (the one file format read from a checkpoint before any data).

header_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=5)
    | st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "x"]), inner, max_size=4),
    max_leaves=10)


@fuzz(150)
@given(header=st.dictionaries(st.text(max_size=8), header_value, max_size=4) | header_value,
       body=st.binary(max_size=64), declared=st.none() | st.integers(0, 2**64 - 1))
def test_safetensors_header_only_checkpoint_errors(header, body, declared):
    raw = json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    path = Path(_tmp_file(struct.pack("<Q", n) + raw + body, ".safetensors"))
    for data in (False, True):
        try:
            for _, arr in read_safetensors(path, data=data):
                assert isinstance(arr, np.ndarray)
        except CheckpointError as err:
            assert str(path) in str(err)


# --------------------------------------------------------------------------------------------
# Regressions: inputs that crashed before the fixes of this change.


@pytest.mark.parametrize("header", [
    {"a": 1},  # TypeError: 'int' object is not subscriptable
    {"a": {"dtype": "F32"}},  # KeyError: 'data_offsets'
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},  # ValueError: unpack
    {"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}},  # ValueError: int('x')
    [1, 2],  # TypeError: list.pop
    {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},  # TypeError: unhashable
])
def test_corrupt_safetensors_header_is_a_checkpoint_error(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        list(read_safetensors(path))
