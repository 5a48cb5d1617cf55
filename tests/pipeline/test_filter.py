"""The filter job on the tiny checkpoint: buckets against independently computed perplexities.

Reference perplexities come from lm-evaluation-harness's `loglikelihood_rolling` (which the score
job is tested to match) over the same texts; records out are compared with records in as parsed
objects (JSONL), typed tables (Parquet) and CSV rows.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.formats import InputError
from pipeline.modes.filter import QUANTILE_ERROR
from pipeline.output import errors_path
from pipeline.writers import read_output

WORDS = ["river", "stone", "quiet", "bright", "seven", "market", "winter", "copper", "lantern",
         "orbit", "meadow", "signal", "harbor", "velvet", "canyon", "ember"]
APPENDED = ("lm_perplexity", "lm_bits_per_byte", "lm_mean_logprob", "lm_num_tokens")


def _texts(n: int, seed: int, style: str = "words") -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 40))
        if style == "words":
            out.append(" ".join(rng.choice(WORDS, k)))
        else:  # a different distribution: digits and punctuation
            out.append(" ".join(str(x) for x in rng.integers(0, 10_000, k)) + "!")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _filter(tmp_path: Path, ck: Path, name: str, pattern: str, **options):
    config = JobConfig(mode="filter", input=pattern, output=str(tmp_path / name), model=str(ck),
                       progress=False, max_tokens_per_batch=512, **options)
    return jobs.run(config), tmp_path / name


def _buckets(out: Path, names) -> dict[str, list[dict]]:
    return {n: read_output(str(out / n)) for n in names}


def _reference_perplexity(lm, texts: list[str]) -> list[float]:
    from lm_eval.api.instance import Instance

    lls = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    return [math.exp(-ll / len(lm.tok_encode(t))) for ll, t in zip(lls, texts, strict=True)]


def test_thresholds_put_each_record_where_its_perplexity_says(tmp_path, tiny_checkpoint,
                                                             lm_eval_hf):
    texts = _texts(30, seed=1)
    ref = _reference_perplexity(lm_eval_hf, texts)
    cut = float(np.median(ref))
    src = _write_jsonl(tmp_path / "in" / "a.jsonl",
                       [{"id": i, "text": t} for i, t in enumerate(texts)])
    summary, out = _filter(tmp_path, tiny_checkpoint, "thr", src, max_value=cut)
    got = _buckets(out, ["kept", "dropped"])
    assert summary.reconciled and summary.buckets == {k: len(v) for k, v in got.items()}
    assert sum(summary.buckets.values()) == len(texts)
    for bucket, rows in got.items():
        for row in rows:
            i = row["id"]
            want = "kept" if ref[i] <= cut else "dropped"
            if abs(ref[i] - cut) > 1e-6 * cut:  # a value at the cut itself may round either way
                assert bucket == want, (i, ref[i], cut)
            assert row["lm_perplexity"] == pytest.approx(ref[i], rel=1e-4)
    marker = json.loads((out / "_SUCCESS").read_text())
    assert marker["filter"]["rule"]["max_value"] == cut
    assert marker["filter"]["buckets"] == summary.buckets
    assert "buckets kept" in summary.line()


def test_quantile_buckets_have_the_asked_fractions_per_group(tmp_path, tiny_checkpoint):
    n = 40
    rows = ([{"id": f"w{i}", "text": t, "lang": "words"} for i, t in enumerate(_texts(n, 2))]
            + [{"id": f"n{i}", "text": t, "lang": "digits"}
               for i, t in enumerate(_texts(n, 3, "digits"))])
    src = _write_jsonl(tmp_path / "in" / "g.jsonl", rows)
    names = ("head", "middle", "tail")
    summary, out = _filter(tmp_path, tiny_checkpoint, "q", src, quantiles=(0.25, 0.75),
                           bucket_names=names, group_field="lang")
    got = _buckets(out, names)
    assert summary.reconciled and sum(summary.buckets.values()) == 2 * n
    rule = json.loads((out / "_SUCCESS").read_text())["filter"]["rule"]
    cuts = {c["group"]: c["cuts"] for c in rule["cut_points"]}
    assert set(cuts) == {"words", "digits"} and cuts["words"] != cuts["digits"]
    for group in ("words", "digits"):
        values = sorted(r["lm_perplexity"] for b in got.values() for r in b
                        if r["lang"] == group)
        per_bucket = [sum(r["lang"] == group for r in got[name]) for name in names]
        for k, q in enumerate((0.25, 0.75)):
            below = sum(per_bucket[:k + 1]) / n
            assert abs(below - q) <= QUANTILE_ERROR + 1 / n, (group, per_bucket)
        # Each record is in the bucket its value and its group's cut points say.
        for k, name in enumerate(names):
            for r in got[name]:
                if r["lang"] == group:
                    lo = cuts[group][k - 1] if k else -math.inf
                    hi = cuts[group][k] if k < len(cuts[group]) else math.inf
                    assert lo < r["lm_perplexity"] <= hi
        assert len(values) == n
    # The cut points of --thresholds-from, applied to a new corpus; a group it never saw is an
    # error row, not a guess.
    new = ([{"id": f"x{i}", "text": t, "lang": "words"} for i, t in enumerate(_texts(9, 7))]
           + [{"id": "y0", "text": "0 1 2 3", "lang": "digits"},
              {"id": "z0", "text": "un texte", "lang": "french"}])
    src2 = _write_jsonl(tmp_path / "in2" / "new.jsonl", new)
    summary2, out2 = _filter(tmp_path, tiny_checkpoint, "again", src2, thresholds_from=str(out),
                             group_field="lang")
    again = _buckets(out2, names)
    assert summary2.reconciled and summary2.error_records == 1
    (error,) = read_output(errors_path(str(out2)))
    assert error["id"] == "new.jsonl:10" and "'french' has no cut points" in error["reason"]
    for k, name in enumerate(names):
        for r in again[name]:
            c = cuts[r["lang"]]
            assert (c[k - 1] if k else -math.inf) < r["lm_perplexity"] <= (
                c[k] if k < len(c) else math.inf)


ODD = [
    {"text": "plain words here", "nested": {"a": [1, 2, {"b": None}]}, "n": 1.5},
    {"text": "naïve café ☕ — ünïcödé", "nested": None, "n": None, "extra": "only here"},
    {"text": " ".join(WORDS * 20), "nested": {"deep": {"er": [[], {}]}}, "n": 10**18},
    {"n": 3, "text": "keys in another order", "flag": True},
]


def test_jsonl_records_come_out_as_they_went_in(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "in" / "odd.jsonl", ODD)
    summary, out = _filter(tmp_path, tiny_checkpoint, "odd", src, min_value=0.0)
    assert summary.buckets == {"kept": len(ODD), "dropped": 0}
    lines = [json.loads(line) for p in sorted((out / "kept").glob("part-*"))
             for line in p.read_text().splitlines()]
    by_text = {r["text"]: r for r in lines}
    for record in ODD:
        got = by_text[record["text"]]
        assert list(got)[:len(record)] == list(record)  # its own keys first, in their order
        assert list(got)[len(record):] == list(APPENDED)
        assert {k: v for k, v in got.items() if k not in APPENDED} == record
        assert got["lm_num_tokens"] == len(got["lm_num_tokens"] * [0])  # an int


def test_parquet_records_keep_their_schema_and_values(tmp_path, tiny_checkpoint):
    schema = pa.schema([
        ("text", pa.string()), ("n", pa.int64()), ("score", pa.float32()),
        ("tags", pa.list_(pa.string())), ("meta", pa.struct([("k", pa.int32())])),
        ("day", pa.date32()), ("at", pa.timestamp("ms")), ("blob", pa.binary()),
    ])
    rows = [{"text": t, "n": i, "score": float(i) / 4, "tags": ["a", "b"][: i % 3],
             "meta": {"k": i} if i % 2 else None, "day": datetime.date(2024, 1, 1 + i),
             "at": datetime.datetime(2024, 1, 1, i), "blob": bytes([i, 0, 255])}
            for i, t in enumerate(_texts(6, 4))]
    src = tmp_path / "in" / "t.parquet"
    src.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src, row_group_size=4)
    summary, out = _filter(tmp_path, tiny_checkpoint, "pq", str(src), max_value=1e12)
    assert summary.buckets == {"kept": 6, "dropped": 0}
    tables = [pq.read_table(p) for p in sorted((out / "kept").glob("part-*.parquet"))]
    table = pa.concat_tables(tables)
    assert table.schema.names == schema.names + list(APPENDED)
    for field in schema:  # every input column with its type
        assert table.schema.field(field.name).type == field.type
    got = sorted(table.select(schema.names).to_pylist(), key=lambda r: r["n"])
    assert got == rows


def test_csv_records_come_out_as_csv(tmp_path, tiny_checkpoint):
    texts = _texts(5, 5) + ['with "quotes", commas\nand a newline']
    src = tmp_path / "in" / "c.csv"
    src.parent.mkdir()
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "note"])
        w.writerows([[str(i), t, "" if i % 2 else "ok"] for i, t in enumerate(texts)])
    summary, out = _filter(tmp_path, tiny_checkpoint, "csv", str(src), max_value=1e12)
    assert summary.buckets["kept"] == len(texts)
    (shard,) = (out / "kept").glob("part-*.csv")
    with shard.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["id", "text", "note", *APPENDED]
    with src.open(newline="") as f:
        want = {r["id"]: r for r in csv.DictReader(f)}
    for r in back:
        assert {k: r[k] for k in ("id", "text", "note")} == want[r["id"]]
        assert float(r["lm_perplexity"]) > 0 and int(r["lm_num_tokens"]) > 0


def test_column_clashes_are_refused_before_or_per_record(tmp_path, tiny_checkpoint):
    src = tmp_path / "in" / "clash.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"text": ["a b"], "lm_perplexity": [1.0]}), src)
    with pytest.raises(ValueError, match="already has a column 'lm_perplexity'"):
        _filter(tmp_path, tiny_checkpoint, "clash", str(src), max_value=1.0)
    assert not (tmp_path / "clash").exists()  # refused before anything was written
    jl = _write_jsonl(tmp_path / "in2" / "clash.jsonl",
                      [{"text": "fine"}, {"text": "taken", "lm_num_tokens": 3}])
    summary, out = _filter(tmp_path, tiny_checkpoint, "clash2", jl, max_value=1e12)
    assert summary.reconciled and summary.error_records == 1
    (error,) = read_output(errors_path(str(out)))
    assert "already has a field 'lm_num_tokens'" in error["reason"]
    # Another prefix resolves it.
    summary, _ = _filter(tmp_path, tiny_checkpoint, "clash3", jl, max_value=1e12,
                         score_prefix="gpt2_")
    assert summary.error_records == 0


@pytest.mark.parametrize("options, message", [
    (dict(quantiles=(0.0, 0.5)), "strictly inside"),
    (dict(quantiles=(0.7, 0.3)), "strictly increasing"),
    (dict(quantiles=(0.3, 0.7), bucket_names=("a", "b")), "make 3 buckets"),
    (dict(quantiles=(0.5,), max_value=3.0), "exactly one rule"),
    (dict(), "exactly one rule"),
    (dict(min_value=5.0, max_value=2.0), "above max_value"),
    (dict(by="loss", max_value=1.0), "by must be one of"),
    (dict(bucket_names=("a", "b")), "exactly one rule"),
    (dict(max_value=1.0, group_field="lang"), "group_field goes with"),
])
def test_bad_rules_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        JobConfig(mode="filter", input="i.jsonl", output="o", **options)


def test_thresholds_from_must_be_a_finished_filter_output(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "some words"}])
    score_out = tmp_path / "scored"
    jobs.run(JobConfig(input=src, output=str(score_out), model=str(tiny_checkpoint),
                       progress=False))
    for source in (score_out, tmp_path / "nowhere"):
        with pytest.raises(InputError, match="is not the output of a finished filter job"):
            _filter(tmp_path, tiny_checkpoint, "from-bad", src, thresholds_from=str(source))
    summary, out = _filter(tmp_path, tiny_checkpoint, "first", src, max_value=1e12)
    with pytest.raises(InputError, match="cut on perplexity; pass --by perplexity"):
        _filter(tmp_path, tiny_checkpoint, "from-by", src, thresholds_from=str(out),
                by="bits_per_byte")


def test_a_rerun_after_a_killed_run_equals_an_uninterrupted_one(tmp_path, tiny_checkpoint):
    rows = [{"id": i, "text": t} for i, t in enumerate(_texts(20, 6))]
    src = _write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    opts = dict(quantiles=(0.5,), bucket_names=("low", "high"))
    _, clean = _filter(tmp_path, tiny_checkpoint, "clean", src, **opts)
    # What a kill during pass 2 leaves: the intermediate files and part of one bucket, no marker.
    out = tmp_path / "killed"
    (out / "_work" / "scored").mkdir(parents=True)
    (out / "_work" / "scored" / "part-00000-of-00001.jsonl").write_text('{"half": ')
    (out / "low").mkdir()
    (out / "low" / "part-00000-of-00002.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="--overwrite"):
        _filter(tmp_path, tiny_checkpoint, "killed", src, **opts)
    _filter(tmp_path, tiny_checkpoint, "killed", src, overwrite=True, **opts)
    for name in ("low", "high"):
        assert sorted(map(json.dumps, read_output(str(out / name)))) == sorted(
            map(json.dumps, read_output(str(clean / name))))
    assert not (out / "_work").exists()
    varying = ("seconds", "output", "model_seconds", "model_load_seconds", "job")  # timings,
    # and where it wrote
    marker = {k: v for k, v in json.loads((out / "_SUCCESS").read_text()).items()
              if k not in varying}
    clean_marker = {k: v for k, v in json.loads((clean / "_SUCCESS").read_text()).items()
                    if k not in varying}
    assert marker == clean_marker


def test_the_filter_is_a_ptransform_other_pipelines_embed(tmp_path, tiny_checkpoint):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.read import ReadRecords

    rows = [{"id": i, "text": t} for i, t in enumerate(_texts(6, 8))]
    src = _write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    summary, out = _filter(tmp_path, tiny_checkpoint, "ref", src, max_value=60000.0)
    want = {n: sorted(r["id"] for r in read_output(str(out / n))) for n in ("kept", "dropped")}
    config = JobConfig(mode="filter", model=str(tiny_checkpoint), max_value=60000.0,
                       progress=False)
    with pytest.raises(ValueError, match="two passes"):
        jobs.filter(config.replace(max_value=None, quantiles=(0.5,)), context=64)
    with BeamTestPipeline() as p:
        routed = p | ReadRecords(src) | jobs.filter(config, context=64)
        for name in ("kept", "dropped"):
            ids = routed[name] | f"Ids{name}" >> beam.Map(lambda r: r["id"])
            assert_that(ids, equal_to(want[name]), label=f"Check{name}")
        assert_that(routed["errors"], equal_to([]), label="NoErrors")
