"""Bad input, generated rather than hand-picked: every record is accounted for.

Hypothesis writes a corpus of JSONL (plain and gzip) and Parquet shards mixing valid records
with every kind of damage (invalid JSON, truncated lines, wrong types, missing fields, empty
strings, texts longer than the context, 1 MB lines, control characters, lone surrogates as
JSON escapes, invalid UTF-8, duplicate ids, deep nesting; Parquet with unexpected schemas,
nulls, empty or corrupt files) and runs the real job (`pipeline.jobs.run`, DirectRunner) on it.

The oracle is computed from what was written, not from the pipeline: the number of input
records (lines of each JSONL file counted as b"\\n"-separated pieces, rows written to each
Parquet file, 1 for a Parquet file whose footer is unreadable) and, line by line, whether the
record must come out as a result or as an error. Every valid record carries a serial `n`
(a kept field), so each result row names the line it came from even with duplicate ids; every
error row names its source file and line and gives a reason.

A few examples run in CI (each is a Beam job of a few seconds); set RELIABILITY_EXAMPLES=200
for a long run. Scoring a 1 MB text costs minutes with the tiny model on a CPU (about 250k
tokens), so in CI the 1 MB lines are ones that fail validation or tokenization (their raw
preview must still be cut to 1000 characters), or prompts that are tokenized in full and
refused for length; the long run also scores 1 MB texts.
"""

from __future__ import annotations

import gzip
import io as pyio
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rel_helpers import examples, on_demand, read_errors, run_cli

from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.output import errors_path, is_complete
from pipeline.writers import read_output

OK, ERROR = "ok", "error"
MAX_NEW_TOKENS = 4
MB = 1_000_000
RAW_LIMIT = 1000

# Short texts: at most 10 characters, so at most 40 byte-level tokens, which leaves room to
# generate in the tiny model's context of 64. Surrogates are excluded here (they have a kind).
short_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10)
control_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x9F, categories=("Cc",))
                       | st.sampled_from(["\u2028", "\u2029", "\u0085", "\ufeff", "\r", "\t"]),
                       min_size=1, max_size=10)
record_id = st.one_of(st.sampled_from(["dup", "x", 7, 0, ""]), st.integers(), st.text(max_size=8))
wrong_type = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                           st.integers(),
                                                                           max_size=2))
bad_id = st.one_of(st.booleans(), st.floats(allow_nan=False), st.none(),
                   st.lists(st.integers(), max_size=2), st.just({"a": 1}))
WORDS = ["the", "model", "reads", "a", "corpus", "of", "lines", "and", "scores", "them"]


@dataclass
class Line:
    """One generated JSONL line: its bytes are built once its serial number is known."""

    kind: str
    expect: str  # OK or ERROR
    make: object = field(repr=False)  # serial -> bytes (no newline)


def _dump(record: dict, ascii_: bool = False) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_).encode("utf-8")


def _insert_after_text_key(line: bytes, bad: bytes) -> bytes:
    key = b'"text": "'
    at = line.index(key) + len(key)
    return line[:at] + bad + line[at:]


KINDS = ["valid", "dup_id", "dup_id", "control", "surrogate_pair", "extra_fields", "long",
         "lone_surrogate", "invalid_json", "truncated", "raw_control", "wrong_type", "non_object",
         "missing_text", "empty_text", "bad_id", "missing_id", "invalid_utf8", "blank",
         "deep_nesting", "nan", "huge_error", "huge_prompt"]
CHEAP = [k for k in KINDS if not k.startswith("huge")]


@st.composite
def jsonl_line(draw, mode: str, kind: str | None = None) -> Line:
    """One line of `kind` (drawn if None), and whether it must end as a result or an error."""
    kind = kind or draw(st.sampled_from(["valid"] * 4 + CHEAP))
    rid = draw(record_id)
    text = draw(short_text)
    if kind == "dup_id":  # two records of every corpus share this id; both must come out
        return Line(kind, OK, lambda n: _dump({"id": "dup", "text": text, "n": n}))
    if kind == "valid":
        ascii_ = draw(st.booleans())
        return Line(kind, OK, lambda n: _dump({"id": rid, "text": text, "n": n}, ascii_))
    if kind == "control":
        ctl = draw(control_text)
        return Line(kind, OK, lambda n: _dump({"id": rid, "text": ctl, "n": n}))
    if kind == "surrogate_pair":  # an escaped pair is one valid character
        return Line(kind, OK, lambda n: _dump({"id": rid, "text": text + "\U0001f600", "n": n},
                                              True))
    if kind == "extra_fields":
        extra = draw(st.dictionaries(st.sampled_from(["a", "b", "text2", "N"]), wrong_type,
                                     max_size=3))
        return Line(kind, OK, lambda n: _dump({**extra, "id": rid, "text": text, "n": n}))
    if kind == "long":  # beyond the context of 64: rolling windows when scored
        words = draw(st.lists(st.sampled_from(WORDS), min_size=70, max_size=220))
        long = " ".join(words)
        return Line(kind, OK if mode == "score" else ERROR,
                    lambda n: _dump({"id": rid, "text": long, "n": n}))
    if kind == "lone_surrogate":
        where = draw(st.integers(0, len(text)))
        bad = text[:where] + draw(st.sampled_from(["\ud800", "\udfff", "\udc00"])) + text[where:]
        return Line(kind, ERROR, lambda n: _dump({"id": rid, "text": bad, "n": n}, True))
    if kind == "invalid_json":
        junk = draw(st.sampled_from([b'{"text": "a",}', b"{text: 'a'}", b'{"text" "a"}',
                                     b"{", b"}", b'{"a": 1}{"b": 2}', b"nul", b"'x'",
                                     b'{"text": "a"]', b"\x00", b"{\"text\": 01}"]))
        return Line(kind, ERROR, lambda n: junk)
    if kind == "truncated":
        frac = draw(st.floats(0.0, 0.99))
        return Line(kind, ERROR, lambda n: (lambda b: b[:int(len(b) * frac)])(
            _dump({"id": rid, "text": text, "n": n})))
    if kind == "raw_control":  # an unescaped control character inside a JSON string
        ch = draw(st.sampled_from([b"\x01", b"\x1f", b"\t", b"\x00"]))
        return Line(kind, ERROR, lambda n: b'{"id": 1, "text": "a' + ch + b'b", "n": %d}' % n)
    if kind == "wrong_type":
        value = draw(wrong_type)
        return Line(kind, ERROR, lambda n: _dump({"id": rid, "text": value, "n": n}))
    if kind == "non_object":
        value = draw(st.one_of(wrong_type, short_text))
        if isinstance(value, dict):
            value = [value]
        return Line(kind, ERROR, lambda n: _dump(value))
    if kind == "missing_text":
        return Line(kind, ERROR, lambda n: _dump({"id": rid, "body": text, "n": n}))
    if kind == "empty_text":
        return Line(kind, ERROR, lambda n: _dump({"id": rid, "text": "", "n": n}))
    if kind == "bad_id":
        value = draw(bad_id)
        return Line(kind, ERROR, lambda n: _dump({"id": value, "text": text, "n": n}))
    if kind == "missing_id":
        return Line(kind, ERROR, lambda n: _dump({"text": text, "n": n}))
    if kind == "invalid_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xed\xa0\x80",
                                    b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return Line(kind, ERROR, lambda n: _insert_after_text_key(
            _dump({"id": rid, "text": text, "n": n}), bad))
    if kind == "blank":
        ws = draw(st.sampled_from([b"", b" ", b"\t \t", b"\r"]))
        return Line(kind, ERROR, lambda n: ws)
    if kind == "deep_nesting":
        depth = draw(st.integers(2000, 200_000))
        return Line(kind, ERROR, lambda n: b"[" * depth + b"]" * depth)
    if kind == "nan":
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return Line(kind, ERROR, lambda n: b'{"id": 1, "text": %s, "n": %d}' % (token, n))
    if kind == "huge_error":  # a 1 MB line that fails: its raw preview must be cut
        unit = draw(st.sampled_from(["a", "é", "日本", " word"]))
        huge = unit * (MB // len(unit.encode()) + 1)  # 1 MB of UTF-8
        why = draw(st.sampled_from(["null_id", "surrogate", "not_text"]))
        if why == "null_id":
            return Line(kind, ERROR, lambda n: _dump({"id": None, "text": huge, "n": n}))
        if why == "surrogate":
            return Line(kind, ERROR, lambda n: _dump({"id": 1, "text": huge + "\ud800", "n": n},
                                                     True))
        return Line(kind, ERROR, lambda n: _dump({"id": 1, "text": [huge], "n": n}))
    # huge_prompt: a 1 MB text. Generation tokenizes it and refuses it for length; scoring it
    # takes minutes on the tiny model, so in score mode it runs on demand only.
    if mode == "score" and not on_demand():
        return Line("valid", OK, lambda n: _dump({"id": rid, "text": text, "n": n}))
    huge = "." * MB
    return Line(kind, OK if mode == "score" else ERROR,
                lambda n: _dump({"id": rid, "text": huge, "n": n}))


@dataclass
class ParquetFile:
    kind: str  # good, schema, empty, corrupt
    table: pa.Table | None
    expect: list[str]  # per row
    corrupt: bytes | None = None


@st.composite
def parquet_file(draw, kind: str | None = None) -> ParquetFile:
    kind = kind or draw(st.sampled_from(["good", "good", "schema", "empty", "corrupt"]))
    if kind in ("good", "empty"):
        rows = [] if kind == "empty" else draw(st.lists(st.tuples(
            st.one_of(st.none(), st.sampled_from(["dup", "p", ""]), st.text(max_size=5)),
            st.one_of(st.none(), st.just(""), short_text)), min_size=1, max_size=12))
        table = pa.table({"id": pa.array([r[0] for r in rows], pa.string()),
                          "text": pa.array([r[1] for r in rows], pa.string()),
                          "n": pa.array([0] * len(rows), pa.int64())})
        expect = [OK if r[0] is not None and r[1] else ERROR for r in rows]
        return ParquetFile(kind, table, expect)
    if kind == "schema":  # every row is an error: the text is not a string, or is absent
        n = draw(st.integers(1, 8))
        texts = draw(st.sampled_from([
            pa.array(list(range(n)), pa.int64()),
            pa.array([b"bytes"] * n, pa.binary()),
            pa.array([["a", "b"]] * n, pa.list_(pa.string())),
            pa.array([{"x": "y"}] * n, pa.struct([("x", pa.string())])),
            pa.array([None] * n, pa.string()),
            None,  # no text column at all
        ]))
        ids = draw(st.sampled_from([pa.array(["i"] * n), pa.array([1.5] * n),
                                    pa.array([None] * n, pa.string())]))
        columns = {"id": ids, "n": pa.array([0] * n, pa.int64())}
        if texts is not None:
            columns["text"] = texts
        else:
            columns["body"] = pa.array(["t"] * n)
        return ParquetFile(kind, pa.table(columns), [ERROR] * n)
    # corrupt: a valid file cut short (no footer), or not Parquet at all
    good = pa.table({"id": ["a"] * 5, "text": ["t"] * 5, "n": [0] * 5})
    sink = pyio.BytesIO()
    pq.write_table(good, sink)
    data = sink.getvalue()
    choice = draw(st.sampled_from(["cut", "garbage", "magic", "empty"]))
    if choice == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif choice == "garbage":
        data = draw(st.binary(min_size=1, max_size=200))
    elif choice == "magic":
        data = b"PAR1" + draw(st.binary(max_size=64)) + b"PAR1"
    else:
        data = b""
    return ParquetFile(kind, None, [ERROR], corrupt=data)


@dataclass
class Corpus:
    expected: dict[tuple[str, int], str]  # (file name, line or row; -1 = whole file) -> OK/ERROR
    serials: dict[int, tuple[str, int]]  # n of each valid record -> (file name, line)
    total: int  # input records, counted from the bytes written


@st.composite
def corpus_spec(draw, mode: str):
    """A rich mix every time: the first JSONL file holds a line of every kind (in a drawn
    order, with drawn contents) and more lines; other JSONL files and the Parquet files
    (one readable, one damaged, more drawn) vary in number and layout."""
    flags = st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())
    kinds = draw(st.permutations(KINDS))
    first = [draw(jsonl_line(mode, k)) for k in kinds]
    first += draw(st.lists(jsonl_line(mode), max_size=15))
    more = draw(st.lists(st.tuples(st.lists(jsonl_line(mode), max_size=20), flags),
                         max_size=2))
    jsonl = [(draw(st.permutations(first)), *draw(flags))]
    jsonl += [(lines, *layout) for lines, layout in more]
    parquet = [draw(parquet_file("good")),
               draw(parquet_file(draw(st.sampled_from(["schema", "empty", "corrupt"]))))]
    parquet += draw(st.lists(parquet_file(), max_size=2))
    return jsonl, parquet


def write_corpus(root: Path, spec) -> Corpus:
    jsonl, parquet = spec
    expected: dict[tuple[str, int], str] = {}
    serials: dict[int, tuple[str, int]] = {}
    total = 0
    serial = 0
    for f, (lines, trailing_newline, crlf, bom, gz) in enumerate(jsonl):
        name = f"{f:02d}-lines.jsonl" + (".gz" if gz else "")
        pieces = []
        for i, line in enumerate(lines):
            serial += 1
            pieces.append(line.make(serial))
            expected[(name, i)] = line.expect
            if line.expect == OK:
                serials[serial] = (name, i)
        eol = b"\r\n" if crlf else b"\n"
        data = eol.join(pieces) + (eol if trailing_newline and pieces else b"")
        if bom:
            data = b"\xef\xbb\xbf" + data
        # The count, from the bytes: pieces between b"\n", the last one only if not empty.
        count = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        if data == b"\xef\xbb\xbf":  # a file holding only a BOM is one (blank) line
            expected[(name, 0)] = ERROR
        elif pieces and pieces[-1] == b"" and not trailing_newline:
            del expected[(name, len(lines) - 1)]  # "a\n" + "" is one line, not two
        assert count == sum(1 for k in expected if k[0] == name)
        total += count
        (root / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
    for f, spec_file in enumerate(parquet):
        name = f"{f:02d}-{spec_file.kind}.parquet"
        if spec_file.corrupt is not None:
            (root / name).write_bytes(spec_file.corrupt)
            expected[(name, -1)] = ERROR
            total += 1
            continue
        table = spec_file.table
        if "n" in table.column_names and table.num_rows:
            ns = []
            for i, want in enumerate(spec_file.expect):
                serial += 1
                ns.append(serial)
                if want == OK:
                    serials[serial] = (name, i)
            table = table.set_column(table.column_names.index("n"), "n", pa.array(ns, pa.int64()))
        pq.write_table(table, root / name, row_group_size=3)
        for i, want in enumerate(spec_file.expect):
            expected[(name, i)] = want
        total += table.num_rows
    return Corpus(expected, serials, total)


def check_run(corpus: Corpus, summary: jobs.JobSummary, output: str, mode: str) -> None:
    """Input records = result records + error records, each accounted to its line."""
    rows = read_output(output)
    errors = read_errors(output)
    assert is_complete(output)
    # Every error names its source and line, and a reason; one error per bad record.
    where = []
    for e in errors:
        assert e["source"] and isinstance(e["reason"], str) and e["reason"].strip(), e
        assert e["raw"] is None or len(e["raw"]) <= RAW_LIMIT, len(e["raw"])
        where.append((os.path.basename(e["source"]), e["line"]))
    assert len(set(where)) == len(where), "two error rows for one record"
    # Each result row is the valid record with its serial (kept field n, as JSON text).
    done = [int(r["n"]) for r in rows]
    assert len(set(done)) == len(done), "a record came out twice"
    want_errors = {k for k, v in corpus.expected.items() if v == ERROR}
    assert set(where) == want_errors, (set(where) ^ want_errors,
                                       [e for e in errors if (os.path.basename(e["source"]),
                                                              e["line"]) not in want_errors])
    assert set(done) == set(corpus.serials), {corpus.serials.get(n) for n in
                                              set(done) ^ set(corpus.serials)}
    assert len(rows) + len(errors) == corpus.total
    assert (summary.input_records, summary.result_records, summary.error_records,
            summary.output_rows) == (corpus.total, len(rows), len(errors), len(rows))
    assert summary.reconciled
    if mode == "score":
        for r in rows:
            assert r["num_tokens"] == len(r["token_ids"]) >= 1


def _job(root: Path, ck: str, mode: str) -> JobConfig:
    config = JobConfig(input=str(root / "in" / "*"), output=str(root / "out"), model=ck,
                       id_field="id", keep_fields=("n",), max_tokens_per_batch=256,
                       progress=False)
    if mode == "generate":
        config = config.replace(mode="generate", prompt_field="text",
                                max_new_tokens=MAX_NEW_TOKENS)
    return config


# No shrinking: each example is a Beam job of seconds, and a failure prints the whole corpus.
@settings(max_examples=examples(5), deadline=None, database=None, print_blob=True,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(data=st.data())
def test_every_record_is_accounted_for(tiny_checkpoint, data):
    mode = data.draw(st.sampled_from(["score", "generate"]), label="mode")
    spec = data.draw(corpus_spec(mode), label="corpus")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        corpus = write_corpus(root / "in", spec)
        config = _job(root, str(tiny_checkpoint), mode)
        summary = jobs.run(config)
        check_run(corpus, summary, config.output, mode)
    kinds = sorted({line.kind for lines, *_ in spec[0] for line in lines}
                   | {f.kind + ".parquet" for f in spec[1]})
    print(f"\n[bad input] {mode}: {corpus.total} records in {len(spec[0]) + len(spec[1])} "
          f"files -> {summary.result_records} results + {summary.error_records} errors; "
          f"kinds: {', '.join(kinds)}")


@pytest.mark.parametrize("what", ["no-match", "missing-model"])
def test_unusable_input_is_one_line_and_no_output(tiny_checkpoint, tmp_path, what):
    """The input as a whole unusable: one line, exit status 2, nothing under the output."""
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n')
    pattern = str(tmp_path / ("*.parquet" if what == "no-match" else "in.jsonl"))
    model = str(tiny_checkpoint if what == "no-match" else tmp_path / "no-model")
    output = tmp_path / "out"
    proc = run_cli("score", "--input", pattern, "--output", str(output), "--model", model,
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2-pipeline: error: "), proc.stderr
    assert ("no input files match" if what == "no-match" else "does not exist") in lines[0]
    assert not output.exists() and not Path(errors_path(str(output))).exists()
