"""Score and generate jobs end to end: real files in, `pipeline.jobs.run` on the DirectRunner,
Parquet out, read back with pyarrow and checked against references computed here.

References: `gpt2model` called directly on the same token ids (the pipeline must add no
numerical difference: 1e-5), and transformers' PyTorch GPT-2 on the same checkpoint (1e-4),
with token ids from transformers' own tokenizer. Each job runs once per module (a fixture) and
several tests read its output.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli_env

from gpt2model import CheckpointError, Generator, SamplingConfig, Scorer, text_windows
from gpt2model import from_pretrained as load_flax
from gpt2model import get_tokenizer as load_tokenizer
from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.formats import InputError
from pipeline.output import OutputExistsError, errors_path
from pipeline.transforms import bucket_lengths
from pipeline.writers import read_output

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 64  # n_positions of the tiny checkpoint
EOS = 50256
BUDGET = 200  # rows 12/6/3 for buckets 16/32/64: the odd one gets padded on 2 devices
TIGHT = 1e-5  # pipeline vs gpt2model called directly
LOOSE = 1e-4  # vs transformers

LONG1 = "The quick brown fox jumps over the lazy dog, again and again. " * 11  # 155 tokens
LONG2 = " ".join(f"Sentence number {i} talks about item {i * 7 % 13}." for i in range(30))  # 270
SCORE_TEXTS = [
    "Hello world",
    "The cat sat on the mat.",
    "naïve café ☕ — 日本語のテキスト",
    "x",
    LONG1,
    LONG2,
    "Text with <|endoftext|> inside it",
    "  leading spaces\nand a newline\ttab",
]
KEEP = ("n", "tags", "meta", "flag", "label", "nul", "absent")
# Prompts of 1..15 tokens: one bucket (16), so each generate job compiles its decode loop once.
PROMPTS = ["Once upon a time", "The meaning of life is", "Hello", "naïve café",
           "In a hole in the ground there lived a hobbit, not a nasty", "A"]
CONTINUATIONS = [
    ("The capital of France is", " Paris"),
    ("", " an empty context"),
    ("1 2 3 4", " 5 6"),
    ("Some context that is rather long. " * 10, " and then it ends"),  # context left-truncated
    ("Start:", " " + LONG1),  # continuation longer than the window
]


# --------------------------------------------------------------------------------------------
# Running jobs and reading their output.


@dataclasses.dataclass
class Run:
    config: JobConfig
    summary: jobs.JobSummary
    rows: list[dict]
    errors: list[dict]


def run_job(config: JobConfig, beam_args: list[str] | None = None) -> Run:
    summary = jobs.run(config, beam_args)
    return Run(config, summary, read_rows(config.output), read_errors(config.output))


def read_rows(output: str) -> list[dict]:
    rows = read_output(output)
    return sorted(rows, key=lambda r: (r["id"], r.get("sample_index", 0)))


def read_errors(output: str) -> list[dict]:
    rows = []
    for path in sorted(Path(errors_path(output)).glob("part-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return rows


def assert_rows_close(a: list[dict], b: list[dict], atol: float) -> None:
    """Same rows (sorted by id) with floats equal within `atol`, everything else exactly."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            u, v = x[key], y[key]
            if key == "perplexity" and u is not None:  # exp(-mean): compare the mean's scale
                u, v = math.log(u), math.log(v)
            tol = atol * max(1, x.get("num_tokens", 1)) if key == "sum_logprob" else atol
            if isinstance(u, float) or (isinstance(u, list) and u and isinstance(u[0], float)):
                np.testing.assert_allclose(np.array(u, float), np.array(v, float), rtol=0,
                                           atol=tol, err_msg=f"{x['id']} {key}")
            else:
                assert u == v, (x["id"], key)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


def output_files(output: str) -> dict[str, tuple[int, int]]:
    found = {}
    for root in (Path(output), Path(errors_path(output))):
        for p in root.rglob("*"):
            if p.is_file():
                st = p.stat()
                found[str(p)] = (st.st_mtime_ns, st.st_size)
    return found


# --------------------------------------------------------------------------------------------
# References.


@dataclasses.dataclass
class Ref:
    hf: Any  # transformers GPT2LMHeadModel
    hf_tok: Any  # transformers GPT2Tokenizer
    scorer: Scorer
    generator: Generator

    def ids(self, text: str) -> list[int]:
        return list(self.hf_tok(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, inputs: list[int]) -> np.ndarray:
        """transformers' log_softmax over the vocabulary at every position: [T, V]."""
        import torch

        with torch.no_grad():
            logits = self.hf(torch.tensor([inputs])).logits[0].float()
            return torch.log_softmax(logits, dim=-1).numpy()

    def rolling(self, seq: list[int], first_target: int, window: int = CONTEXT,
                stride: int = CONTEXT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probs of seq[first_target:] in rolling windows (lm-evaluation-harness with
        stride == window; the Hugging Face perplexity guide's sliding window otherwise).

        The first chunk of `window` targets, then chunks of `stride` targets, each chunk
        predicted in one call over the `window` tokens that precede its last target.
        Returns (log-probs, argmax == target, top-1 minus top-2 log-prob) per target.
        """
        lp, greedy, margin = [], [], []
        t0, step = first_target, window
        while t0 < len(seq):
            t1 = min(t0 + step, len(seq))
            start = max(0, t1 - 1 - window)
            logp = self.logprobs(seq[start:t1 - 1])
            for j in range(t0, t1):
                row = logp[j - 1 - start]
                top2 = np.partition(row, -2)[-2:]
                lp.append(row[seq[j]])
                greedy.append(int(np.argmax(row)) == seq[j])
                margin.append(top2[1] - top2[0])
            t0, step = t1, stride
        return np.array(lp, np.float32), np.array(greedy), np.array(margin)

    def lm_eval_loglikelihood(self, ctx: list[int], cont: list[int]) -> tuple[np.ndarray, bool]:
        """lm-evaluation-harness's loglikelihood, literally: the last window+1 tokens of
        context + continuation, the continuation's log-probs from the final positions."""
        assert len(cont) <= CONTEXT
        whole = ((ctx or [EOS]) + cont)[-(CONTEXT + 1):]
        logp = self.logprobs(whole[:-1])[-len(cont):]
        picked = logp[np.arange(len(cont)), cont]
        return picked.astype(np.float32), bool(np.all(logp.argmax(-1) == np.array(cont)))

    def hf_greedy(self, prompt_ids: list[int], max_new_tokens: int
                  ) -> tuple[list[int], list[float], list[float]]:
        """transformers generate(do_sample=False): new tokens (cut at eos), their log-probs,
        and each step's top-1 minus top-2 log-prob (a near tie may break either way)."""
        import torch

        with torch.no_grad():
            out = self.hf.generate(torch.tensor([prompt_ids]),
                                   attention_mask=torch.ones(1, len(prompt_ids), dtype=int),
                                   do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=EOS, eos_token_id=EOS,
                                   return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(prompt_ids):].tolist()
        logps, margins = [], []
        for step, tok in zip(out.logits, new, strict=False):
            row = torch.log_softmax(step[0].float(), -1)
            top2 = torch.topk(row, 2).values
            logps.append(row[tok].item())
            margins.append((top2[0] - top2[1]).item())
        n = new.index(EOS) if EOS in new else len(new)
        return new[:n], logps[:n], margins[:n]


@pytest.fixture(scope="module")
def ck(tiny_checkpoint: Path) -> str:
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def ref(ck: str) -> Ref:
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(ck, torch_dtype="float32").eval()
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(ck)
    config, params = load_flax(ck)
    return Ref(hf, hf_tok, Scorer(config, params), Generator(config, params, load_tokenizer(ck)))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


# --------------------------------------------------------------------------------------------
# The jobs (each runs once per module).


def _score_records() -> list[dict]:
    return [{"text": t, "n": i, "tags": ["a", i], "meta": {"x": i}, "flag": i % 2 == 0,
             "label": f"L{i}", "nul": None} for i, t in enumerate(SCORE_TEXTS)]


@pytest.fixture(scope="module")
def score_jsonl_config(work: Path, ck: str) -> JobConfig:
    return JobConfig(input=write_jsonl(work / "score-in" / "texts.jsonl", _score_records()),
                     output=str(work / "score-out"), model=ck, keep_fields=KEEP,
                     max_tokens_per_batch=BUDGET, progress=False)


@pytest.fixture(scope="module")
def score_jsonl(score_jsonl_config: JobConfig) -> Run:
    return run_job(score_jsonl_config)


PARQUET_SCHEMA = pa.schema([
    ("rid", pa.int64()), ("text", pa.string()), ("n", pa.int64()),
    ("tags", pa.list_(pa.string())), ("meta", pa.struct([("x", pa.int64())])),
    ("flag", pa.bool_()), ("score", pa.float64()), ("day", pa.date32()),
])
PARQUET_KEEP = ("n", "tags", "meta", "flag", "score", "day", "absent")


def _parquet_records() -> list[dict]:
    import datetime

    texts = SCORE_TEXTS + [""]  # allow_empty: a row with no tokens
    return [{"rid": 100 + i, "text": t, "n": i, "tags": [f"t{i}"] * (i % 3),
             "meta": {"x": -i}, "flag": bool(i % 2), "score": i / 4,
             "day": datetime.date(2024, 1, 1 + i)} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def score_parquet(work: Path, ck: str) -> Run:
    records = _parquet_records()
    src = work / "score-pq"
    src.mkdir()
    half = len(records) // 2
    for name, part in (("a.parquet", records[:half]), ("b.parquet", records[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=PARQUET_SCHEMA), src / name,
                       row_group_size=2)
    config = JobConfig(input=str(src / "*.parquet"), output=str(work / "score-pq-out"),
                       model=ck, id_field="rid", keep_fields=PARQUET_KEEP, stride=24,
                       allow_empty=True, max_tokens_per_batch=BUDGET, progress=False,
                       pack=False)  # the bucketed path; the JSONL runs pack (the default)
    return run_job(config)


@pytest.fixture(scope="module")
def continuation_run(work: Path, ck: str) -> Run:
    path = write_jsonl(work / "cont-in.jsonl",
                       [{"id": f"c{i}", "ctx": c, "text": x}
                        for i, (c, x) in enumerate(CONTINUATIONS)])
    config = JobConfig(input=path, output=str(work / "cont-out"), model=ck, id_field="id",
                       context_field="ctx", max_tokens_per_batch=BUDGET, progress=False)
    return run_job(config)


@pytest.fixture(scope="module")
def generate_greedy(work: Path, ck: str) -> Run:
    path = write_jsonl(work / "gen-in.jsonl",
                       [{"prompt": p, "label": i} for i, p in enumerate(PROMPTS)])
    config = JobConfig(mode="generate", input=path, output=str(work / "gen-out"), model=ck,
                       max_new_tokens=8, num_samples=2, keep_fields=("label",),
                       max_tokens_per_batch=BUDGET, progress=False)
    return run_job(config)


def _sampled_config(work: Path, ck: str, name: str, budget: int) -> JobConfig:
    src = work / "gen-pq" / "prompts.parquet"
    if not src.exists():
        src.parent.mkdir()
        pq.write_table(pa.table({"prompt": PROMPTS, "k": list(range(len(PROMPTS)))}), src,
                       row_group_size=4)
    return JobConfig(mode="generate", input=str(src), output=str(work / name), model=ck,
                     max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=1234,
                     num_samples=3, keep_fields=("k",), max_tokens_per_batch=budget,
                     progress=False)


@pytest.fixture(scope="module")
def generate_sampled(work: Path, ck: str) -> tuple[Run, Run]:
    """The same sampled job with two batch budgets (different batch shapes and groupings)."""
    big = run_job(_sampled_config(work, ck, "sampled-big", 150))
    small = run_job(_sampled_config(work, ck, "sampled-small", 60))
    return big, small


# --------------------------------------------------------------------------------------------
# Score: numbers.


def _check_score_rows(run: Run, texts: dict[str, str], ref: Ref, stride: int | None) -> None:
    rows = {r["id"]: r for r in run.rows}
    assert sorted(rows) == sorted(texts)
    ids = {k: ref.ids(t) for k, t in texts.items()}
    keys = [k for k in texts if ids[k]]
    direct = dict(zip(keys, ref.scorer.score_texts([ids[k] for k in keys], window=CONTEXT,
                                                   stride=stride), strict=True))
    for key, text in texts.items():
        row, want = rows[key], ids[key]
        assert row["token_ids"] == want
        assert row["num_tokens"] == len(want)
        if not want:
            assert row["token_logprobs"] == [] and row["mean_logprob"] is None
            continue
        lp = np.array(row["token_logprobs"], np.float64)
        # gpt2model called directly, same windows: no numerical difference.
        np.testing.assert_allclose(lp, direct[key].logprobs, rtol=0, atol=TIGHT, err_msg=key)
        assert row["greedy"] == direct[key].greedy.tolist()
        # transformers, with <|endoftext|> prepended and the same rolling windows.
        hf_lp, hf_greedy, margin = ref.rolling([EOS] + want, 1, CONTEXT, stride or CONTEXT)
        np.testing.assert_allclose(lp, hf_lp, rtol=0, atol=LOOSE, err_msg=key)
        clear = margin > 1e-3
        assert np.array_equal(np.array(row["greedy"])[clear], hf_greedy[clear]), key
        total = float(np.sum(hf_lp, dtype=np.float64))
        assert row["sum_logprob"] == pytest.approx(total, abs=LOOSE * len(want))
        assert row["mean_logprob"] == pytest.approx(total / len(want), abs=LOOSE)
        assert row["perplexity"] == pytest.approx(math.exp(-row["mean_logprob"]), rel=1e-12)
        assert row["bits_per_byte"] == pytest.approx(
            -row["sum_logprob"] / (math.log(2) * len(text.encode("utf-8"))), rel=1e-12)


def test_score_jsonl_matches_gpt2model_and_transformers(score_jsonl: Run, ref: Ref) -> None:
    assert any(len(ref.ids(t)) > 2 * CONTEXT for t in SCORE_TEXTS)  # rolling windows merged
    texts = {f"texts.jsonl:{i}": t for i, t in enumerate(SCORE_TEXTS)}
    _check_score_rows(score_jsonl, texts, ref, stride=None)
    s = score_jsonl.summary
    assert (s.input_records, s.result_records, s.output_rows, s.error_records) == (8, 8, 8, 0)
    assert s.reconciled and score_jsonl.errors == []
    assert s.tokens == sum(r["num_tokens"] for r in score_jsonl.rows)


def test_score_parquet_with_stride_matches_references(score_parquet: Run, ref: Ref) -> None:
    texts = {str(100 + i): t for i, t in enumerate(SCORE_TEXTS + [""])}
    _check_score_rows(score_parquet, texts, ref, stride=24)
    s = score_parquet.summary
    assert (s.input_records, s.result_records, s.error_records) == (9, 9, 0) and s.reconciled


def test_continuation_scoring_matches_lm_eval_definition(continuation_run: Run,
                                                         ref: Ref, lm_eval_hf) -> None:
    rows = {r["id"]: r for r in continuation_run.rows}
    assert sorted(rows) == [f"c{i}" for i in range(len(CONTINUATIONS))]
    # Tokenized by lm-eval itself: the context's trailing space joins the continuation.
    pairs = [([EOS], ref.ids(x)) if not c else lm_eval_hf._encode_pair(c, x)
             for c, x in CONTINUATIONS]
    direct = ref.scorer.score_continuations(pairs, window=CONTEXT)
    for i, ((ctx, cont), (total, greedy)) in enumerate(zip(pairs, direct, strict=True)):
        row = rows[f"c{i}"]
        assert row["token_ids"] == cont and row["num_tokens"] == len(cont)
        lp = np.array(row["token_logprobs"], np.float64)
        assert row["sum_logprob"] == pytest.approx(total, abs=TIGHT * len(cont))
        assert row["is_greedy"] == greedy
        if len(cont) <= CONTEXT:
            want, want_greedy = ref.lm_eval_loglikelihood(ctx, cont)
        else:  # past the window: the same definition over rolling windows
            want, g, _ = ref.rolling((ctx or [EOS]) + cont, len(ctx or [EOS]))
            want_greedy = bool(g.all())
        np.testing.assert_allclose(lp, want, rtol=0, atol=LOOSE, err_msg=f"c{i}")
        assert row["is_greedy"] == want_greedy
        assert row["is_greedy"] == all(row["greedy"])
        context, text = CONTINUATIONS[i]
        text = context[len(context.rstrip()):] + text  # what the scored tokens spell
        assert row["bits_per_byte"] == pytest.approx(
            -row["sum_logprob"] / (math.log(2) * len(text.encode("utf-8"))), rel=1e-12)
    assert len(pairs[3][0]) > CONTEXT and len(pairs[4][1]) > CONTEXT
    assert continuation_run.summary.reconciled


# --------------------------------------------------------------------------------------------
# Output schema and kept fields.


def _file_schema(output: str) -> pa.Schema:
    schemas = {pq.read_schema(p) for p in sorted(Path(output).glob("part-*.parquet"))}
    assert len(schemas) == 1
    return schemas.pop()


def _assert_schema(output: str, expected: pa.Schema) -> None:
    got = _file_schema(output)
    assert got.names == expected.names
    for name in expected.names:
        # Arrow type equality ignores the list element's name ("element" in Parquet files).
        assert got.field(name).type == expected.field(name).type, name


def test_output_schemas(score_jsonl: Run, score_parquet: Run, continuation_run: Run,
                        generate_greedy: Run, generate_sampled: tuple[Run, Run]) -> None:
    _assert_schema(score_jsonl.config.output, jobs.output_schema(score_jsonl.config))
    assert all(_file_schema(score_jsonl.config.output).field(k).type == pa.string()
               for k in KEEP)  # JSONL input: kept fields are text
    keep_types = {k: PARQUET_SCHEMA.field(k).type for k in PARQUET_KEEP if k != "absent"}
    expected = jobs.output_schema(score_parquet.config, keep_types)
    _assert_schema(score_parquet.config.output, expected)
    assert expected.field("absent").type == pa.string()
    assert "is_greedy" in jobs.output_schema(continuation_run.config).names
    _assert_schema(continuation_run.config.output, jobs.output_schema(continuation_run.config))
    _assert_schema(generate_greedy.config.output, jobs.output_schema(generate_greedy.config))
    big = generate_sampled[0]
    _assert_schema(big.config.output, jobs.output_schema(big.config, {"k": pa.int64()}))


def test_keep_fields_jsonl_as_text_parquet_typed(score_jsonl: Run, score_parquet: Run) -> None:
    for row in score_jsonl.rows:
        i = int(row["id"].rsplit(":", 1)[1])
        # Strings are kept as they are; other JSON values as their JSON text; null stays null.
        assert {k: row[k] for k in KEEP} == {
            "n": str(i), "tags": json.dumps(["a", i]), "meta": json.dumps({"x": i}),
            "flag": "true" if i % 2 == 0 else "false", "label": f"L{i}", "nul": None,
            "absent": None}
    source = {str(r["rid"]): r for r in _parquet_records()}
    for row in score_parquet.rows:
        want = source[row["id"]]
        assert {k: row[k] for k in PARQUET_KEEP} == {
            **{k: want[k] for k in PARQUET_KEEP if k != "absent"}, "absent": None}


# --------------------------------------------------------------------------------------------
# Generate.


def test_generate_greedy_matches_generator_and_transformers(generate_greedy: Run,
                                                            ref: Ref) -> None:
    ids = [f"gen-in.jsonl:{i}" for i in range(len(PROMPTS))]
    direct = ref.generator.generate(PROMPTS, settings=SamplingConfig(max_new_tokens=8),
                                    keys=ids, num_samples=2, batch_size=12)
    rows = generate_greedy.rows
    assert [(r["id"], r["sample_index"]) for r in rows] == [(k, s) for k in sorted(ids)
                                                             for s in (0, 1)]
    for row in rows:
        i = ids.index(row["id"])
        gen = direct[i][row["sample_index"]]
        assert row["prompt"] == PROMPTS[i] and row["label"] == str(i)
        assert (row["token_ids"], row["text"], row["finish_reason"]) == (
            gen.token_ids, gen.text, gen.finish_reason)
        np.testing.assert_allclose(row["token_logprobs"], gen.logprobs, rtol=0, atol=TIGHT)
        hf_ids, hf_logps, margins = ref.hf_greedy(ref.ids(PROMPTS[i]), 8)
        diverge = next((k for k, (a, b) in enumerate(zip(row["token_ids"], hf_ids, strict=False))
                     if a != b), None)
        if diverge is not None:  # only a near tie between two tokens may go the other way
            assert margins[diverge] < LOOSE, (row["id"], diverge, margins[diverge])
            continue
        assert row["token_ids"] == hf_ids, row["id"]
        np.testing.assert_allclose(row["token_logprobs"], hf_logps, rtol=0, atol=LOOSE)
        assert row["text"] == ref.hf_tok.decode(hf_ids)
        assert row["finish_reason"] == ("length" if len(hf_ids) == 8 else "eos")
    s = generate_greedy.summary
    assert (s.input_records, s.result_records, s.output_rows, s.error_records) == (6, 6, 12, 0)


def test_sampled_generation_is_seeded_and_independent_of_batching(
        generate_sampled: tuple[Run, Run], ref: Ref) -> None:
    big, small = generate_sampled
    assert big.summary.batches < small.summary.batches  # the budgets did batch differently
    # The same samples; log-probs differ only by float rounding across batch shapes.
    assert [r["token_ids"] for r in small.rows] == [r["token_ids"] for r in big.rows]
    assert_rows_close(small.rows, big.rows, TIGHT)
    ids = [f"prompts.parquet:{i}" for i in range(len(PROMPTS))]
    cfg = big.config
    settings = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p)
    direct = ref.generator.generate(PROMPTS, settings=settings, seed=cfg.seed, keys=ids,
                                    num_samples=cfg.num_samples, batch_size=5)
    assert len(big.rows) == len(PROMPTS) * 3
    for row in big.rows:
        i = ids.index(row["id"])
        gen = direct[i][row["sample_index"]]
        assert row["token_ids"] == gen.token_ids and row["text"] == gen.text
        np.testing.assert_allclose(row["token_logprobs"], gen.logprobs, rtol=0, atol=TIGHT)
        assert row["k"] == i  # Parquet keeps its int64
    # The samples of a prompt differ (they are keyed by sample index, not copies).
    for i in range(len(PROMPTS)):
        samples = [r["token_ids"] for r in big.rows if r["id"] == ids[i]]
        assert len({tuple(s) for s in samples}) > 1


# --------------------------------------------------------------------------------------------
# Runners and devices.


def test_multi_processing_gives_the_same_rows(score_jsonl: Run, work: Path) -> None:
    config = score_jsonl.config.replace(output=str(work / "score-mp"))
    run = run_job(config, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert_rows_close(run.rows, score_jsonl.rows, TIGHT)
    s, base = run.summary, score_jsonl.summary
    assert (s.input_records, s.result_records, s.error_records, s.tokens) == (
        base.input_records, base.result_records, base.error_records, base.tokens)


_TWO_DEVICES = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    assert jax.device_count() == 2, jax.devices()
    from pipeline import jobs
    from pipeline.config import JobConfig
    from pipeline.handler import DataParallel
    assert DataParallel().size == 2
    fields = json.loads(sys.argv[1])
    fields["keep_fields"] = tuple(fields["keep_fields"])
    summary = jobs.run(JobConfig(**fields))
    print("SUMMARY " + json.dumps(dataclasses.asdict(summary)))
""")


def test_two_devices_give_the_same_rows(score_jsonl: Run, work: Path) -> None:
    config = score_jsonl.config.replace(output=str(work / "score-2dev"))
    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, json.dumps(dataclasses.asdict(config))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary["input_records"] == summary["result_records"] == 8
    assert_rows_close(read_rows(config.output), score_jsonl.rows, TIGHT)


# --------------------------------------------------------------------------------------------
# Bad input.


def _bad_corpus(root: Path) -> str:
    """Every kind of bad record, in JSONL (plain and truncated gzip) and Parquet files."""
    root.mkdir()
    lines = [
        b'{"text": "a fine record"}',
        b'{"text": "oops",}',
        b"[1, 2]",
        b'{"other": "x"}',
        b'{"text": null}',
        b'{"text": 5}',
        b'{"text": ["a"]}',
        b'{"text": {"a": 1}}',
        b'{"text": false}',
        b'{"text": ""}',
        b'{"text": "caf\xe9"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b"",
        json.dumps({"text": "word " * 70}).encode(),  # fine to score, too long to generate
        b'{"text": "kept lone surrogate", "tags": ["\\udfff"], "n": 1.5}',
        b'{"text": "trunc',  # truncated last line, no newline
    ]
    (root / "a.jsonl").write_bytes(b"\n".join(lines))
    gz = gzip.compress(b"".join(json.dumps({"text": f"gz line {i}"}).encode() + b"\n"
                                for i in range(40)))
    (root / "b.jsonl.gz").write_bytes(gz[: len(gz) - 30])
    pq.write_table(pa.table({"text": ["good parquet", None, ""]}), root / "c.parquet")
    (root / "d.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    return str(root / "*")


# (file, line) -> the reason, or a callable checking it; None = a result row, not an error.
BAD_EXPECTED: dict[tuple[str, int], Any] = {
    ("a.jsonl", 0): None,
    ("a.jsonl", 1): lambda r: r.startswith("invalid JSON: "),
    ("a.jsonl", 2): "JSON value is not an object (got list)",
    ("a.jsonl", 3): "missing field 'text'",
    ("a.jsonl", 4): "null field 'text'",
    ("a.jsonl", 5): "field 'text' is a int, expected a string",
    ("a.jsonl", 6): "field 'text' is a list, expected a string",
    ("a.jsonl", 7): "field 'text' is a dict, expected a string",
    ("a.jsonl", 8): "field 'text' is a bool, expected a string",
    ("a.jsonl", 9): "empty text in field 'text'",
    ("a.jsonl", 10): "invalid UTF-8 at byte 13",
    ("a.jsonl", 11): lambda r: "surrogate" in r,
    ("a.jsonl", 12): "blank line",
    ("a.jsonl", 13): None,
    ("a.jsonl", 14): None,
    ("a.jsonl", 15): lambda r: r.startswith("invalid JSON: Unterminated string"),
    ("c.parquet", 0): None,
    ("c.parquet", 1): "null field 'text'",
    ("c.parquet", 2): "empty text in field 'text'",
    ("d.parquet", -1): lambda r: r.startswith("unreadable parquet footer"),
}
# Errors that say which field of the record failed carry its (default) id.
WITH_ID = {("a.jsonl", i) for i in (3, 4, 5, 6, 7, 8, 9, 11)} | {("c.parquet", 1), ("c.parquet", 2)}


@pytest.fixture(scope="module")
def bad_runs(work: Path, ck: str) -> tuple[Run, Run]:
    pattern = _bad_corpus(work / "bad")
    score = JobConfig(input=pattern, output=str(work / "bad-score"), model=ck,
                      keep_fields=("tags", "n"), max_tokens_per_batch=BUDGET,
                      progress=True)  # the live progress line must not get in the way
    generate = score.replace(mode="generate", output=str(work / "bad-gen"), prompt_field="text",
                             max_new_tokens=16, num_samples=2)
    return run_job(score), run_job(generate)


def _check_bad_run(run: Run, expected: dict[tuple[str, int], Any],
                   with_id: set[tuple[str, int]] = WITH_ID) -> None:
    errors = {(os.path.basename(e["source"]), e["line"]): e for e in run.errors}
    assert len(errors) == len(run.errors)  # one error row per bad record
    gz_errors = [k for k in errors if k[0] == "b.jsonl.gz"]
    assert len(gz_errors) == 1  # the truncated gzip: its readable lines, then one error
    gz_line = gz_errors[0][1]
    assert errors[gz_errors[0]]["reason"].startswith(f"file unreadable from line {gz_line} on")
    assert gz_line > 0
    want_errors = {k for k, v in expected.items() if v is not None} | {gz_errors[0]}
    assert set(errors) == want_errors
    for key, want in expected.items():
        if want is None:
            continue
        reason = errors[key]["reason"]
        assert reason == want if isinstance(want, str) else want(reason), (key, reason)
        assert errors[key]["id"] == (f"{key[0]}:{key[1]}" if key in with_id else None), key
        raw = errors[key]["raw"]
        assert raw is None or isinstance(raw, str)
    done = {r["id"] for r in run.rows}
    want_done = {f"{f}:{i}" for (f, i), v in expected.items() if v is None}
    want_done |= {f"b.jsonl.gz:{i}" for i in range(gz_line)}
    assert done == want_done
    s = run.summary
    n_input = len(expected) + 1 + gz_line  # + the gzip error + its good lines
    assert (s.input_records, s.result_records, s.error_records) == (
        n_input, len(want_done), len(errors))
    assert s.output_rows == len(run.rows)
    assert s.reconciled


def test_bad_input_score(bad_runs: tuple[Run, Run]) -> None:
    run = bad_runs[0]
    _check_bad_run(run, BAD_EXPECTED)
    kept = next(r for r in run.rows if r["id"] == "a.jsonl:14")
    assert kept["tags"] == '["?"]' and kept["n"] == "1.5"  # JSON text, made writable


def test_bad_input_generate(bad_runs: tuple[Run, Run]) -> None:
    expected = {**BAD_EXPECTED,
                ("a.jsonl", 9): "empty prompt in field 'text'",
                ("c.parquet", 2): "empty prompt in field 'text'",
                ("a.jsonl", 13): "prompt of 71 tokens leaves no room for max_new_tokens=16 in "
                                 "the model's context of 64"}
    _check_bad_run(bad_runs[1], expected, WITH_ID | {("a.jsonl", 13)})
    assert bad_runs[1].summary.output_rows == 2 * bad_runs[1].summary.result_records


# --------------------------------------------------------------------------------------------
# Reruns and up-front failures.


def test_rerun_with_overwrite_is_identical(score_jsonl: Run, generate_sampled: tuple[Run, Run]
                                           ) -> None:
    for before in (score_jsonl, generate_sampled[0]):
        config = before.config.replace(overwrite=True)
        again = run_job(config)
        assert again.rows == before.rows
        assert again.summary.output_rows == before.summary.output_rows


def test_refusals_before_any_output(score_jsonl: Run, work: Path, ck: str) -> None:
    existing = score_jsonl.config
    files = output_files(existing.output)
    assert files
    with pytest.raises(OutputExistsError, match="--overwrite"):
        jobs.run(existing.replace(overwrite=False))
    assert output_files(existing.output) == files  # untouched

    fresh = existing.replace(output=str(work / "never-written"))
    with pytest.raises(InputError, match="no input files match"):
        jobs.run(fresh.replace(input=str(work / "nothing-here" / "*.jsonl")))
    empty_dir = work / "empty-model"
    empty_dir.mkdir()
    no_weights = work / "config-only-model"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(ck) / "config.json").read_text())
    hub_offline = "no-such-org/no-such-gpt2"  # HF_HUB_OFFLINE=1 (conftest): fails fast
    for model in (str(work / "no-such-model"), str(empty_dir), str(no_weights), hub_offline):
        with pytest.raises(CheckpointError):
            jobs.run(fresh.replace(model=model))
    assert not Path(fresh.output).exists()
    assert not Path(errors_path(fresh.output)).exists()


# --------------------------------------------------------------------------------------------
# Compiles.


def _score_shapes(config: JobConfig, ref: Ref, texts: list[str]) -> set[int]:
    buckets = bucket_lengths(config, CONTEXT)
    shapes = set()
    for text in texts:
        for w in text_windows(ref.ids(text), window=CONTEXT, stride=config.stride,
                              bos_token_id=EOS):
            shapes.add(min(b for b in buckets if b >= len(w.input_ids)))
    return shapes


def test_compiles_at_most_once_per_bucket_shape(score_jsonl: Run, score_parquet: Run,
                                                generate_greedy: Run, ref: Ref) -> None:
    assert score_jsonl.config.pack and not score_parquet.config.pack
    # Packed: one [rows, context] shape, plus part-filled tails at most tail_steps shapes.
    assert 1 <= score_jsonl.summary.compiles <= score_jsonl.config.tail_steps
    shapes = _score_shapes(score_parquet.config, ref, SCORE_TEXTS)
    assert 1 <= score_parquet.summary.compiles <= len(shapes) * score_parquet.config.tail_steps
    for run in (score_jsonl, score_parquet):
        assert run.summary.padded_tokens >= run.summary.input_tokens >= run.summary.tokens
        assert 0 < run.summary.model_seconds < run.summary.seconds
        assert 0 < run.summary.padding_efficiency <= 1
    cfg = generate_greedy.config
    buckets = bucket_lengths(cfg, CONTEXT, cfg.max_new_tokens)
    shapes = {min(b for b in buckets if b >= len(ref.ids(p))) for p in PROMPTS}
    assert 1 <= generate_greedy.summary.compiles <= len(shapes) * cfg.tail_steps


# --------------------------------------------------------------------------------------------
# The CLI.


def _cli(args: list[str]):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_cli_score(score_jsonl: Run, work: Path, ck: str) -> None:
    out = str(work / "cli-score")
    _cli(["score", "--input", score_jsonl.config.input, "--output", out, "--model", ck,
          "--max-tokens-per-batch", str(BUDGET), "--keep-fields", ",".join(KEEP),
          "--no-progress"])
    assert_rows_close(read_rows(out), score_jsonl.rows, TIGHT)


def test_cli_generate_with_stop(generate_greedy: Run, work: Path, ck: str, ref: Ref) -> None:
    # A stop string taken from the greedy output of the first prompt, so it does occur.
    first = next(r for r in generate_greedy.rows if r["id"] == "gen-in.jsonl:0")
    stop = first["text"][len(first["text"]) // 2:][:3]
    assert stop.strip()
    out = str(work / "cli-gen")
    _cli(["generate", "--input", generate_greedy.config.input, "--output", out, "--model", ck,
          "--max-new-tokens", "8", "--stop", stop, "--stop", "\n\n\n\n",
          "--max-tokens-per-batch", str(BUDGET), "--no-progress"])
    rows = read_rows(out)
    ids = [f"gen-in.jsonl:{i}" for i in range(len(PROMPTS))]
    direct = ref.generator.generate(PROMPTS, settings=SamplingConfig(max_new_tokens=8),
                                    keys=ids, stop=(stop, "\n\n\n\n"), batch_size=12)
    assert [r["id"] for r in rows] == sorted(ids)
    for row in rows:
        gen = direct[ids.index(row["id"])][0]
        assert (row["token_ids"], row["text"], row["finish_reason"]) == (
            gen.token_ids, gen.text, gen.finish_reason)
    assert rows[0]["finish_reason"] == "stop" and stop not in rows[0]["text"]
