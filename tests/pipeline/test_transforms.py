"""The record-level steps of pipeline.transforms, each run on the real DirectRunner.

Several applications share one TestPipeline where they can (a pipeline costs about a second).
Expected token ids come from transformers' own GPT-2 tokenizer, not from our tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # not a test class
from apache_beam.testing.util import assert_that, equal_to
from conftest import beam_matcher as _matcher

from pipeline.config import JobConfig
from pipeline.formats import SourceRecord
from pipeline.modes.generate import GenerateItem
from pipeline.modes.score import PartScores, ScoreItem, ScoreMeta, empty_row, merge_parts
from pipeline.modes.score import row as score_row
from pipeline.records import EMPTY, ERRORS, Record
from pipeline.transforms import (
    BucketBatch,
    ParseRecords,
    Tokenize,
    bucket_lengths,
    padded_rows,
    rows_for,
)

SRC = "/data/shard-0.jsonl"
BASE = "shard-0.jsonl"
EOS = 50256
CONTEXT = 64  # n_positions of the tiny checkpoint
LONG = "The quick brown fox jumps over the lazy dog, again and again. " * 12


def _sr(index: int, value, raw: str | None = None, error: str | None = None) -> SourceRecord:
    return SourceRecord(SRC, index, value, raw if raw is not None else repr(value), error)


def _err(index: int, record_id, reason: str, raw: str) -> dict:
    return {"source": SRC, "line": index, "id": record_id, "reason": reason, "raw": raw}


def _rec(index: int, text: str, keep: dict, record_id: str | None = None,
         context: str | None = None) -> Record:
    return Record(f"{SRC}:{index}", record_id or f"{BASE}:{index}", text, context, keep, SRC,
                  index)


# --------------------------------------------------------------------------------------------
# ParseRecords


def _parse(p, label: str, config: JobConfig, records: list[SourceRecord]):
    out = (p | f"Create{label}" >> beam.Create(records)
           | f"Parse{label}" >> beam.ParDo(ParseRecords(config)).with_outputs(ERRORS,
                                                                             main="records"))
    return out.records, out[ERRORS]


def test_parse_records_every_bad_input() -> None:
    long_raw = "x" * 5000
    plain = [
        # A reader error passes through with its reason and raw line, id unknown.
        _sr(0, None, '{"text": "oops",}', "invalid JSON: Expecting property name enclosed in "
            "double quotes at column 17"),
        _sr(1, None, "[1, 2]", "JSON value is not an object (got list)"),
        _sr(2, None, "\ufffd\ufffd", "invalid UTF-8 at byte 0"),
        # A value that is not a dict although the reader said it parsed.
        _sr(3, [1, 2], "[1, 2]"),
        _sr(4, {"other": "x"}),
        _sr(5, {"text": None}),
        _sr(6, {"text": 5}),
        _sr(7, {"text": ["a", "b"]}),
        _sr(8, {"text": {"a": 1}}),
        _sr(9, {"text": True}),
        _sr(10, {"text": 1.5}),
        _sr(11, {"text": ""}),
        _sr(12, {"text": 7}, long_raw),
        # Good records: keep fields copied as they are, missing ones as None, strings cleaned.
        _sr(13, {"text": "hello", "a": 1, "b": [1, {"c": None}]}),
        _sr(14, {"text": "héllo wörld", "a": "s\ud800", "b": ["\udfff", {"k\ud800": "v"}]}),
        _sr(15, {"text": " ", "a": None, "b": True}),
    ]
    plain_cfg = JobConfig(keep_fields=("a", "b"))
    plain_errors = [
        _err(0, None, plain[0].error, plain[0].raw),
        _err(1, None, plain[1].error, "[1, 2]"),
        _err(2, None, "invalid UTF-8 at byte 0", "\ufffd\ufffd"),
        _err(3, None, "record is a list, not an object", "[1, 2]"),
        _err(4, f"{BASE}:4", "missing field 'text'", repr({"other": "x"})),
        _err(5, f"{BASE}:5", "null field 'text'", repr({"text": None})),
        _err(6, f"{BASE}:6", "field 'text' is a int, expected a string", repr({"text": 5})),
        _err(7, f"{BASE}:7", "field 'text' is a list, expected a string",
             repr({"text": ["a", "b"]})),
        _err(8, f"{BASE}:8", "field 'text' is a dict, expected a string",
             repr({"text": {"a": 1}})),
        _err(9, f"{BASE}:9", "field 'text' is a bool, expected a string", repr({"text": True})),
        _err(10, f"{BASE}:10", "field 'text' is a float, expected a string",
             repr({"text": 1.5})),
        _err(11, f"{BASE}:11", "empty text in field 'text'", repr({"text": ""})),
        _err(12, f"{BASE}:12", "field 'text' is a int, expected a string", "x" * 1000),
    ]
    plain_records = [
        _rec(13, "hello", {"a": 1, "b": [1, {"c": None}]}),
        _rec(14, "héllo wörld", {"a": "s?", "b": ["?", {"k?": "v"}]}),
        _rec(15, " ", {"a": None, "b": True}),
    ]

    with_ids = [
        _sr(0, {"text": "a"}),
        _sr(1, {"text": "b", "id": None}),
        _sr(2, {"text": "c", "id": 7}),
        _sr(3, {"text": "d", "id": "abc"}),
        _sr(4, {"text": "e", "id": True}),
        _sr(5, {"text": "f", "id": 1.5}),
        _sr(6, {"text": "g", "id": ["x"]}),
        _sr(7, {"text": None, "id": "has-id"}),
        _sr(8, {"text": "", "id": "empty-ok"}),
    ]
    ids_cfg = JobConfig(id_field="id", allow_empty=True)
    ids_errors = [
        _err(0, None, "missing or null id field 'id'", with_ids[0].raw),
        _err(1, None, "missing or null id field 'id'", with_ids[1].raw),
        _err(4, None, "id field 'id' is a bool, expected a string or integer", with_ids[4].raw),
        _err(5, None, "id field 'id' is a float, expected a string or integer", with_ids[5].raw),
        _err(6, None, "id field 'id' is a list, expected a string or integer", with_ids[6].raw),
        _err(7, "has-id", "null field 'text'", with_ids[7].raw),
    ]
    ids_records = [_rec(2, "c", {}, "7"), _rec(3, "d", {}, "abc"),
                   _rec(8, "", {}, "empty-ok")]  # empty text allowed with allow_empty

    continuation = [
        _sr(0, {"text": "cont", "ctx": "the context"}),
        _sr(1, {"text": "cont"}),
        _sr(2, {"text": "cont", "ctx": 3}),
        _sr(3, {"text": "cont", "ctx": ""}),  # an empty context is allowed (eos stands in)
        _sr(4, {"text": "", "ctx": "c"}),
    ]
    cont_cfg = JobConfig(context_field="ctx")
    cont_errors = [
        _err(1, f"{BASE}:1", "missing field 'ctx'", continuation[1].raw),
        _err(2, f"{BASE}:2", "field 'ctx' is a int, expected a string", continuation[2].raw),
        _err(4, f"{BASE}:4", "empty text in field 'text'", continuation[4].raw),
    ]
    cont_records = [_rec(0, "cont", {}, context="the context"), _rec(3, "cont", {}, context="")]

    prompts = [
        _sr(0, {"prompt": "Once upon", "text": 1}),  # text_field is not read in generate mode
        _sr(1, {"prompt": ""}),
        _sr(2, {"text": "no prompt"}),
        _sr(3, {"prompt": 12}),
    ]
    gen_cfg = JobConfig(mode="generate", allow_empty=True)  # allow_empty is for score only
    gen_errors = [
        _err(1, f"{BASE}:1", "empty prompt in field 'prompt'", prompts[1].raw),
        _err(2, f"{BASE}:2", "missing field 'prompt'", prompts[2].raw),
        _err(3, f"{BASE}:3", "field 'prompt' is a int, expected a string", prompts[3].raw),
    ]
    gen_records = [_rec(0, "Once upon", {})]

    p = BeamTestPipeline()
    for label, cfg, inputs, records, errors in [
        ("Plain", plain_cfg, plain, plain_records, plain_errors),
        ("Ids", ids_cfg, with_ids, ids_records, ids_errors),
        ("Cont", cont_cfg, continuation, cont_records, cont_errors),
        ("Gen", gen_cfg, prompts, gen_records, gen_errors),
    ]:
        assert len(records) + len(errors) == len(inputs)
        got, bad = _parse(p, label, cfg, inputs)
        assert_that(got, equal_to(records), label=f"Records{label}")
        assert_that(bad, equal_to(errors), label=f"Errors{label}")
    p.run().wait_until_finish()


# --------------------------------------------------------------------------------------------
# Tokenize


@pytest.fixture(scope="module")
def hf_tok(tiny_checkpoint: Path):
    """transformers' GPT-2 tokenizer over the checkpoint's vocabulary: the reference ids."""
    import transformers

    return transformers.GPT2Tokenizer.from_pretrained(tiny_checkpoint)


def _ids(hf_tok, text: str) -> list[int]:
    return list(hf_tok(text, add_special_tokens=False)["input_ids"])


def _check_score_items(expected: dict[str, tuple[list[int], int, list[int] | None]],
                       bos: int | None = EOS):
    """Matcher: per record key, (text ids, number of windows, context ids or None)."""

    def check(items):
        assert all(isinstance(it, ScoreItem) for it in items)
        by_key = defaultdict(list)
        for it in items:
            by_key[it.key].append(it)
        assert set(by_key) == set(expected)
        for key, (ids, parts, ctx) in expected.items():
            got = sorted(by_key[key], key=lambda it: it.part)
            assert [it.part for it in got] == list(range(parts)), key
            assert {it.parts for it in got} == {parts}, key
            assert got[0].meta is not None and all(it.meta is None for it in got[1:]), key
            meta = got[0].meta
            assert list(meta.token_ids) == ids
            assert meta.conditional == (ctx is not None)
            # The full token sequence the windows are cut from.
            seq = (list(ctx) or [EOS]) + ids if ctx is not None else [bos] + ids
            first = len(seq) - len(ids)
            scored = []
            for it in got:
                w = it.window
                assert 0 < len(w.input_ids) <= CONTEXT
                assert len(w.targets) == len(w.input_ids)
                # Each window is a contiguous piece of the sequence, targets shifted by one.
                start = w.target_offset + first - w.score_start - 1
                assert start >= 0
                assert list(w.input_ids) == seq[start:start + len(w.input_ids)], key
                assert list(w.targets) == seq[start + 1:start + 1 + len(w.targets)], key
                assert w.score_end == len(w.input_ids)  # the window ends at its last target
                assert w.target_offset == len(scored)
                scored += list(w.targets[w.score_start:w.score_end])
            assert scored == ids, key  # every token scored once, in order

    return _matcher(check)


def test_tokenize_score_windows_and_continuations(tiny_checkpoint: Path, hf_tok,
                                                  lm_eval_hf) -> None:
    model = str(tiny_checkpoint)
    short, long_ = "hello world", LONG
    short_ids, long_ids = _ids(hf_tok, short), _ids(hf_tok, long_)
    n = len(long_ids)
    assert n > 2 * CONTEXT
    records = [_rec(0, short, {"k": 1}), _rec(1, long_, {}), _rec(2, "", {"k": 2})]

    ctx_long = "Some context that is rather long. " * 10
    cont_records = [
        _rec(0, " world", {}, context="hello"),
        _rec(1, " the end", {}, context=""),
        _rec(2, " a continuation", {}, context=ctx_long),  # context left-truncated
        _rec(3, long_, {}, context="Start:"),  # continuation longer than the window
    ]
    # Pairs are tokenized as lm-evaluation-harness does; its own encoder is the reference.
    pairs = [([], _ids(hf_tok, r.text)) if not r.context
             else lm_eval_hf._encode_pair(r.context, r.text) for r in cont_records]
    ctx_ids = [list(c) for c, _ in pairs]
    cont_ids = [list(x) for _, x in pairs]
    assert len(ctx_ids[2]) > CONTEXT

    def tokenize(p, label, cfg, recs):
        return (p | f"Create{label}" >> beam.Create(recs)
                | f"Tokenize{label}" >> beam.ParDo(Tokenize(cfg)).with_outputs(
                    ERRORS, EMPTY, main="items"))

    p = BeamTestPipeline()
    plain = tokenize(p, "Plain", JobConfig(model=model, allow_empty=True), records)
    assert_that(plain.items, _check_score_items({
        f"{SRC}:0": (short_ids, 1, None),
        f"{SRC}:1": (long_ids, math.ceil(n / CONTEXT), None),
    }), label="PlainItems")
    assert_that(plain[EMPTY], equal_to([ScoreMeta(
        id=f"{BASE}:2", keep={"k": 2}, source=SRC, index=2, token_ids=(),
        num_bytes=0, conditional=False)]), label="PlainEmpty")
    assert_that(plain[ERRORS], equal_to([]), label="PlainErrors")

    strided = tokenize(p, "Stride", JobConfig(model=model, stride=16), records[:2])
    assert_that(strided.items, _check_score_items({
        f"{SRC}:0": (short_ids, 1, None),
        f"{SRC}:1": (long_ids, 1 + math.ceil((n - CONTEXT) / 16), None),
    }), label="StrideItems")

    no_bos = tokenize(p, "NoBos", JobConfig(model=model, add_bos=False),
                      [_rec(0, short, {}), _rec(1, "hi", {})])
    assert len(_ids(hf_tok, "hi")) == 1
    assert_that(no_bos.items, _matcher(lambda items: _no_bos_check(items, short_ids)),
                label="NoBosItems")
    assert_that(no_bos[ERRORS], equal_to([_err(
        1, f"{BASE}:1", "text has a single token and --no-add-bos leaves nothing to score",
        "hi")]), label="NoBosErrors")

    cont = tokenize(p, "Cont", JobConfig(model=model, context_field="ctx"), cont_records)
    assert_that(cont.items, _check_score_items({
        f"{SRC}:{i}": (cont_ids[i], math.ceil(len(cont_ids[i]) / CONTEXT), ctx_ids[i])
        for i in range(4)}), label="ContItems")
    p.run().wait_until_finish()


def _no_bos_check(items, short_ids):
    (item,) = items
    assert list(item.meta.token_ids) == short_ids
    assert list(item.window.input_ids) == short_ids[:-1]
    assert list(item.window.targets) == short_ids[1:]


def test_tokenize_generate_items_and_errors(tiny_checkpoint: Path, hf_tok) -> None:
    model = str(tiny_checkpoint)
    cfg = JobConfig(mode="generate", model=model, max_new_tokens=8, num_samples=3,
                    keep_fields=("k",))
    fits = "word " * 55  # 56 tokens (the last "word" has no space): exactly the room left
    too_long = "word " * 56
    assert len(_ids(hf_tok, fits)) == CONTEXT - 8
    assert len(_ids(hf_tok, too_long)) == CONTEXT - 8 + 1
    records = [_rec(0, "Once upon a time", {"k": "v"}), _rec(1, fits, {}),
               _rec(2, too_long, {}), _rec(3, json.loads('"bad \\ud800 text"'), {})]
    score_records = [_rec(0, "x\ud800", {}), _rec(1, "fine", {}, context="ctx \udfff"),
                     _rec(2, "fine", {})]

    def check(items):
        assert all(isinstance(it, GenerateItem) for it in items)
        got = sorted((it.key, it.sample_index) for it in items)
        assert got == sorted((f"{SRC}:{i}", s) for i in (0, 1) for s in range(3))
        for it in items:
            i = int(it.key.rsplit(":", 1)[1])
            assert list(it.prompt_ids) == _ids(hf_tok, records[i].text)
            assert it.meta.id == f"{BASE}:{i}"
            assert it.meta.prompt == records[i].text
            assert it.meta.keep == records[i].keep

    def check_errors(rows):
        by_line = {r["line"]: r for r in rows}
        assert sorted(by_line) == [2, 3]
        assert by_line[2]["reason"] == (
            "prompt of 57 tokens leaves no room for max_new_tokens=8 in the model's context "
            "of 64")
        assert by_line[2]["id"] == f"{BASE}:2"
        assert "surrogate" in by_line[3]["reason"]
        assert by_line[3]["raw"] == "bad ? text"  # cleaned so the errors writer cannot fail
        for r in rows:
            assert r["source"] == SRC

    def check_score_errors(rows):
        assert sorted(r["line"] for r in rows) == [0, 1]
        assert all("surrogate" in r["reason"] for r in rows)
        assert all(r["raw"].encode("utf-8") for r in rows)

    p = BeamTestPipeline()
    out = (p | beam.Create(records)
           | beam.ParDo(Tokenize(cfg)).with_outputs(ERRORS, EMPTY, main="items"))
    assert_that(out.items, _matcher(check), label="Items")
    assert_that(out[ERRORS], _matcher(check_errors), label="Errors")
    scored = (p | "CreateScore" >> beam.Create(score_records)
              | "TokenizeScore" >> beam.ParDo(Tokenize(JobConfig(model=model))).with_outputs(
                  ERRORS, EMPTY, main="items"))
    assert_that(scored[ERRORS], _matcher(check_score_errors), label="ScoreErrors")
    assert_that(scored.items | beam.Map(lambda it: it.key), equal_to([f"{SRC}:2"]),
                label="ScoreItems")
    p.run().wait_until_finish()


# --------------------------------------------------------------------------------------------
# BucketBatch


@dataclasses.dataclass(frozen=True)
class _Item:
    key: int
    length: int


def _check_batches(items: list[_Item], cfg: JobConfig, extra: int):
    buckets = bucket_lengths(cfg, CONTEXT, extra)

    def check(batches):
        seen = Counter()
        used = set()
        for length, batch in batches:
            assert length in buckets
            assert 1 <= len(batch) <= rows_for(length, cfg, extra)
            lower = max([b for b in buckets if b < length], default=0)
            for it in batch:
                # One padded length per batch, the smallest bucket the item fits.
                assert lower < it.length <= length, (it, length)
                seen[it.key] += 1
            used.add(length)
        assert seen == Counter(it.key for it in items)  # every item exactly once
        assert len(used) >= 3

    return _matcher(check)


def test_part_filled_batches_pad_to_the_next_tail_step() -> None:
    cfg = JobConfig(max_tokens_per_batch=8 * 64)  # 8 rows of 64
    assert [padded_rows(n, 64, cfg) for n in range(1, 9)] == [2, 2, 4, 4, 6, 6, 8, 8]
    shapes = {padded_rows(n, 64, cfg) for n in range(1, 9)}
    assert len(shapes) <= cfg.tail_steps  # the compile bound per length
    one = cfg.replace(tail_steps=1)
    assert {padded_rows(n, 64, one) for n in range(1, 9)} == {8}
    # More steps than rows: every row count is its own shape, never more than the full batch.
    many = cfg.replace(tail_steps=100)
    assert [padded_rows(n, 64, many) for n in range(1, 9)] == list(range(1, 9))
    assert padded_rows(3, 56, cfg.replace(mode="generate", max_new_tokens=8), 8) == 4
    with pytest.raises(ValueError, match="tail_steps"):
        JobConfig(tail_steps=0)


def test_bucket_batch_shapes_and_completeness() -> None:
    rng = random.Random(0)
    score_items = [_Item(i, rng.randint(1, CONTEXT)) for i in range(300)]
    gen_items = [_Item(i, rng.randint(1, CONTEXT - 8)) for i in range(200)]
    cfg = JobConfig(max_tokens_per_batch=128, bucket_boundaries=(8, 16, 32))
    gen_cfg = cfg.replace(mode="generate", max_new_tokens=8)
    assert bucket_lengths(cfg, CONTEXT) == (8, 16, 32, 64)
    assert bucket_lengths(gen_cfg, CONTEXT, 8) == (8, 16, 32, 56)
    assert [rows_for(b, cfg) for b in (8, 16, 32, 64)] == [16, 8, 4, 2]
    assert [rows_for(b, cfg, 8) for b in (8, 16, 32, 56)] == [8, 5, 3, 2]
    assert rows_for(64, cfg.replace(max_tokens_per_batch=10)) == 1

    p = BeamTestPipeline()
    # Several bundles: Create splits its input, and the reshuffle spreads it further.
    batches = (p | "CreateScore" >> beam.Create(score_items, reshuffle=True)
               | "BatchScore" >> beam.ParDo(BucketBatch(cfg, CONTEXT)))
    assert_that(batches, _check_batches(score_items, cfg, 0), label="ScoreBatches")
    gen = (p | "CreateGen" >> beam.Create(gen_items)
           | "BatchGen" >> beam.ParDo(BucketBatch(gen_cfg, CONTEXT, 8)))
    assert_that(gen, _check_batches(gen_items, gen_cfg, 8), label="GenBatches")
    default = (p | "CreateDefault" >> beam.Create(score_items)
               | "BatchDefault" >> beam.ParDo(BucketBatch(JobConfig(max_tokens_per_batch=256),
                                                          CONTEXT)))
    assert_that(default, _check_batches(score_items, JobConfig(max_tokens_per_batch=256), 0),
                label="DefaultBatches")
    p.run().wait_until_finish()

    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        BucketBatch(cfg, CONTEXT).bucket(CONTEXT + 1)


# --------------------------------------------------------------------------------------------
# merge_parts, score rows


def _meta(ids, text: str, conditional: bool = False, keep=None, record_id="r") -> ScoreMeta:
    return ScoreMeta(id=record_id, keep=keep or {}, source=SRC, index=0, token_ids=tuple(ids),
                     num_bytes=len(text.encode("utf-8")), conditional=conditional)


def test_merge_parts_in_pipeline() -> None:
    rng = np.random.default_rng(0)
    lp = [rng.normal(-5, 1, n).astype(np.float32) for n in (64, 64, 7)]
    gr = [rng.random(n) < 0.3 for n in (64, 64, 7)]
    meta = _meta(list(range(135)), "x" * 135)
    parts = [PartScores("a", i, 3, 64 * i, lp[i], gr[i], meta if i == 0 else None)
             for i in (2, 0, 1)]  # out of order, as a GroupByKey hands them over
    other = [PartScores("b", i, 2, i, np.array([-1.0 - i], np.float32),
                          np.array([bool(i)]), _meta([1], "b", record_id="b") if i == 0 else None)
             for i in (1, 0)]

    def check(results):
        by_key = {r.key: r for r in results}
        assert set(by_key) == {"a", "b"}
        a = by_key["a"]
        np.testing.assert_array_equal(a.logprobs, np.concatenate(lp))
        np.testing.assert_array_equal(a.greedy, np.concatenate(gr))
        assert a.meta is meta or a.meta == meta
        assert (a.part, a.parts) == (0, 1)
        np.testing.assert_array_equal(by_key["b"].logprobs, [-1.0, -2.0])
        np.testing.assert_array_equal(by_key["b"].greedy, [False, True])

    p = BeamTestPipeline()
    merged = (p | beam.Create(parts + other) | beam.Map(lambda r: (r.key, r))
              | beam.GroupByKey() | beam.Map(merge_parts))
    assert_that(merged, _matcher(check))
    p.run().wait_until_finish()

    with pytest.raises(RuntimeError, match="got windows"):
        merge_parts(("a", parts[:2]))


def _expected_stats(lp: np.ndarray, text: str) -> dict:
    total = float(np.sum(lp.astype(np.float64)))
    mean = total / len(lp)
    return {"sum_logprob": total, "mean_logprob": mean, "perplexity": math.exp(-mean),
            "bits_per_byte": -total / (math.log(2) * len(text.encode("utf-8")))}


def test_score_row_statistics() -> None:
    text = "naïve café ☕"  # multi-byte characters: bits per byte counts UTF-8 bytes
    ids = [1, 2, 3, 4, 5]
    lp = np.array([-1.5, -2.25, -0.5, -3.0, -4.125], np.float32)
    gr = np.array([True, False, True, True, False])
    cfg = JobConfig(keep_fields=("k",))
    results = [
        ("plain", PartScores("a", 0, 1, 0, lp, gr, _meta(ids, text, keep={"k": 7})), cfg),
        ("nobos", PartScores("b", 0, 1, 0, lp[1:], gr[1:], _meta(ids, text)),
         cfg.replace(add_bos=False)),
        ("cont", PartScores("c", 0, 1, 0, lp[:2], np.array([True, True]),
                              _meta(ids[:2], text, conditional=True)),
         cfg.replace(context_field="ctx")),
    ]

    def check(rows):
        by_name = dict(rows)
        plain = by_name["plain"]
        assert plain["token_ids"] == ids and plain["num_tokens"] == 5
        assert plain["token_logprobs"] == [float(x) for x in lp]
        assert plain["greedy"] == [True, False, True, True, False]
        assert plain["k"] == 7 and "is_greedy" not in plain
        for key, value in _expected_stats(lp, text).items():
            assert plain[key] == pytest.approx(value, rel=1e-12), key
        nobos = by_name["nobos"]
        assert nobos["token_logprobs"][0] is None  # the first token has no context
        assert nobos["token_logprobs"][1:] == [float(x) for x in lp[1:]]
        assert nobos["num_tokens"] == 4 and nobos["greedy"][0] is False
        for key, value in _expected_stats(lp[1:], text).items():
            assert nobos[key] == pytest.approx(value, rel=1e-12), key
        cont = by_name["cont"]
        assert cont["is_greedy"] is True and cont["num_tokens"] == 2
        assert cont["sum_logprob"] == pytest.approx(-3.75)

    p = BeamTestPipeline()
    rows = (p | beam.Create(results)
            | beam.MapTuple(lambda name, result, config: (name, score_row(result, config))))
    assert_that(rows, _matcher(check))
    p.run().wait_until_finish()

    row = empty_row(_meta([], "", keep={"k": None}), cfg)
    assert row == {"id": "r", "num_tokens": 0, "token_ids": [], "token_logprobs": [],
                   "sum_logprob": 0.0, "mean_logprob": None, "perplexity": None,
                   "bits_per_byte": None, "greedy": [], "k": None}


def test_job_tokenizer_is_built_once_until_its_files_change(tmp_path, tiny_checkpoint):
    """One process's launch checks, tokenize step and model step share one tokenizer, but a
    checkpoint rewritten in place (here: merges changed) is read again, never served stale."""
    import shutil

    from pipeline.transforms import job_tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    first = job_tokenizer(str(ckpt))
    assert job_tokenizer(str(ckpt)) is first
    assert first.encode("The Manhattan bridge") == [464, 13458, 7696]
    merges = (ckpt / "merges.txt").read_text(encoding="utf-8").splitlines()
    # Drop the merge that joins " bridge" and every later one: the text splits further.
    cut = next(i for i, m in enumerate(merges) if m.replace(" ", "") == "Ġbridge")
    (ckpt / "merges.txt").write_text("\n".join(merges[:cut]) + "\n", encoding="utf-8")
    again = job_tokenizer(str(ckpt))
    assert again is not first
    assert len(again.encode("The Manhattan bridge")) > 3  # fewer merges, more pieces
