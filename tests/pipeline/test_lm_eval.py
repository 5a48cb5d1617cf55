"""Score jobs against lm-evaluation-harness itself (lm-eval 0.4, HF backend, tiny checkpoint).

Pairs against `HFLM.loglikelihood`, whole texts against `HFLM.loglikelihood_rolling`, multiple
choice against a real lm-eval `ConfigurableTask` (its requests, its log-likelihoods, its
`process_results` acc/acc_norm), top-K and entropy against a float64 log-softmax of
transformers' logits. Tolerance 1e-4 on sums in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2model.scoring import text_windows
from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.output import errors_path
from pipeline.writers import read_output

CONTEXT = 64  # n_positions of the tiny checkpoint
ATOL = 1e-4
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron"]

PAIRS = [
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
    ("Question: 2 + 2?\nAnswer:\n", "4"),  # a newline
    ("Name\t", "value"),  # a tab
    ("Hel", "lo world"),  # a split inside a word
    ("The quick brown fo", "x jumps"),
    ("Voilà, le café ", "crème brûlée ☕"),  # non-ASCII
    ("", "an empty context"),
    (" ".join(WORDS * 8), " and then it ends"),  # context longer than the window
]


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _run(tmp_path: Path, name: str, ck: Path, rows: list[dict], **options):
    config = JobConfig(input=_write(tmp_path / f"{name}.jsonl", rows),
                       output=str(tmp_path / name), model=str(ck), id_field="id",
                       progress=False, max_tokens_per_batch=256, **options)
    summary = jobs.run(config)
    return summary, {r["id"]: r for r in read_output(config.output)}


def _edge_pairs(lm) -> list[tuple[str, str]]:
    """Pairs whose context + continuation is exactly the window (+1: no truncation) and one
    token past it (lm-eval drops the context's first token)."""
    out = []
    for extra in (0, 1):
        cont = " " + " ".join(WORDS[:3])
        n_cont = len(lm.tok_encode(cont))
        words = []
        while len(lm.tok_encode(" ".join(words))) < CONTEXT + 1 + extra - n_cont:
            words.append(WORDS[len(words) % len(WORDS)])
        ctx = " ".join(words)
        assert len(lm.tok_encode(ctx)) + n_cont in (CONTEXT + 1 + extra, CONTEXT + 2 + extra)
        out.append((ctx, cont))
    return out


def test_pairs_equal_lm_eval_loglikelihood(tmp_path, tiny_checkpoint, lm_eval_hf):
    from lm_eval.api.instance import Instance

    pairs = PAIRS + _edge_pairs(lm_eval_hf)
    rows = [{"id": f"p{i}", "ctx": c, "text": x} for i, (c, x) in enumerate(pairs)]
    summary, got = _run(tmp_path, "pairs", tiny_checkpoint, rows, context_field="ctx")
    assert summary.reconciled and summary.result_records == len(pairs)
    want = lm_eval_hf.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for i, ((ll, greedy), pair) in enumerate(zip(want, pairs, strict=True)):
        row = got[f"p{i}"]
        assert row["sum_logprob"] == pytest.approx(ll, abs=ATOL), (i, pair)
        assert row["is_greedy"] == greedy, (i, pair)
        # The scored tokens are lm-eval's: enc(context + continuation)[len(enc(context)):].
        if pair[0]:
            assert row["token_ids"] == lm_eval_hf._encode_pair(*pair)[1], (i, pair)


def test_a_whitespace_only_context_scores_after_endoftext(tmp_path, tiny_checkpoint,
                                                         lm_eval_hf):
    """lm-eval cannot score it (its context is empty after the whitespace move and its HF
    backend asserts a non-empty context): we score it as lm-eval scores an empty context, the
    moved whitespace leading the continuation."""
    from lm_eval.api.instance import Instance

    _, got = _run(tmp_path, "ws", tiny_checkpoint, [{"id": "w", "ctx": "  \n", "text": "hi"}],
                  context_field="ctx")
    (want,) = lm_eval_hf.loglikelihood([Instance("loglikelihood", {}, ("", "  \nhi"), 0)])
    assert got["w"]["sum_logprob"] == pytest.approx(want[0], abs=ATOL)


def test_rolling_documents_equal_lm_eval_loglikelihood_rolling(tmp_path, tiny_checkpoint,
                                                               lm_eval_hf):
    from lm_eval.api.instance import Instance

    docs = [" ".join(WORDS[: 3 + i]) * (1 + 7 * i) for i in range(4)]  # 1 to 4+ windows
    assert max(len(lm_eval_hf.tok_encode(d)) for d in docs) > 3 * CONTEXT
    summary, got = _run(tmp_path, "rolling", tiny_checkpoint,
                        [{"id": f"d{i}", "text": d} for i, d in enumerate(docs)])
    want = lm_eval_hf.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    for i, ll in enumerate(want):
        assert got[f"d{i}"]["sum_logprob"] == pytest.approx(ll, abs=ATOL * 4), i


def _mc_docs() -> list[dict]:
    rng = np.random.default_rng(7)
    docs = []
    for i in range(12):
        n = 2 + i % 9  # 2..10 choices
        choices = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(n)]
        if i == 5:  # context + this choice exceed the window: scored alone, left-truncated
            choices[1] = " ".join(WORDS * 2 + WORDS[:7])
        ctx = f"Question {i}: which words come next?\nAnswer:"
        if i == 7:
            ctx = " ".join(WORDS * 3)  # a context that nearly fills the window
        docs.append({"id": f"q{i}", "ctx": ctx, "choices": choices, "label": int(i % n)})
    return docs


def test_multiple_choice_equals_an_lm_eval_task(tmp_path, tiny_checkpoint, lm_eval_hf,
                                                monkeypatch):
    from lm_eval.api.task import ConfigurableTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = _mc_docs()
    data = _write(tmp_path / "mc-data" / "test.jsonl", docs)
    task = ConfigurableTask(config={
        "task": "mc_test", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{ctx}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})
    summary, got = _run(tmp_path, "mc", tiny_checkpoint, docs, context_field="ctx",
                        choices_field="choices", label_field="label", target_delimiter=" ")
    assert summary.reconciled and summary.result_records == len(docs)
    long_choice = lm_eval_hf._encode_pair(docs[5]["ctx"], " " + docs[5]["choices"][1])
    assert sum(map(len, long_choice)) > CONTEXT + 1 and len(long_choice[1]) <= CONTEXT
    accs, acc_norms = [], []
    for doc in task.test_docs():
        requests = task.construct_requests(doc, task.fewshot_context(doc, num_fewshot=0))
        results = lm_eval_hf.loglikelihood(requests)
        metrics = task.process_results(doc, results)
        row = got[doc["id"]]
        np.testing.assert_allclose(row["choice_logprobs"], [ll for ll, _ in results],
                                   rtol=0, atol=ATOL, err_msg=doc["id"])
        assert row["choice_is_greedy"] == [g for _, g in results]
        assert row["correct"] == bool(metrics["acc"]), doc["id"]
        assert row["correct_norm"] == bool(metrics["acc_norm"]), doc["id"]
        assert row["choice_num_tokens"] == [len(lm_eval_hf._encode_pair(*r.args)[1])
                                            for r in requests]
        accs.append(metrics["acc"])
        acc_norms.append(metrics["acc_norm"])
    assert summary.labelled == len(docs)
    assert summary.accuracy == pytest.approx(np.mean(accs))
    assert summary.accuracy_norm == pytest.approx(np.mean(acc_norms))
    marker = json.loads((tmp_path / "mc" / "_SUCCESS").read_text())
    assert marker["accuracy"] == summary.accuracy and marker["labelled"] == len(docs)
    assert "accuracy" in summary.line()
    # The context is computed once per tree, not once per choice, in one packed shape.
    naive = sum(len(lm_eval_hf.tok_encode(d["ctx"])) * len(d["choices"]) for d in docs)
    assert summary.input_tokens < naive
    assert summary.compiles <= JobConfig().tail_steps


def test_top_logprobs_and_entropy_equal_a_float64_log_softmax(tmp_path, tiny_checkpoint):
    import torch
    import transformers

    texts = ["The Manhattan bridge", "naïve café", " ".join(WORDS * 6)]  # the last is rolling
    k = 5
    _, got = _run(tmp_path, "top", tiny_checkpoint,
                  [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)],
                  top_logprobs=k, entropy=True, stride=32)
    _, plain = _run(tmp_path, "plain", tiny_checkpoint,
                    [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)], stride=32)
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    checked = 0
    for i in range(len(texts)):
        row = got[f"t{i}"]
        assert row["sum_logprob"] == plain[f"t{i}"]["sum_logprob"]  # same pass, same numbers
        # The windows the job scored (which context each target had), then transformers' own
        # logits over each window, in float64.
        for w in text_windows(row["token_ids"], window=CONTEXT, stride=32, bos_token_id=50256):
            with torch.no_grad():
                logits = model(torch.tensor([w.input_ids])).logits[0].double().numpy()
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            for pos in range(w.score_start, w.score_end):
                j = w.target_offset + pos - w.score_start
                order = np.argsort(-logp[pos])
                top_ids, top_lp = row["top_token_ids"][j], row["top_logprobs"][j]
                assert len(top_ids) == k and top_lp == sorted(top_lp, reverse=True)
                np.testing.assert_allclose(top_lp, logp[pos, order[:k]], atol=ATOL)
                # Ties may come in any order: compare the ids by their log-probs.
                np.testing.assert_allclose(logp[pos, top_ids], logp[pos, order[:k]], atol=ATOL)
                entropy = -np.sum(np.exp(logp[pos]) * logp[pos])
                assert row["entropy"][j] == pytest.approx(entropy, abs=ATOL)
                checked += 1
    assert checked == sum(len(r["token_ids"]) for r in got.values())


def test_summary_only_drops_the_per_token_columns_and_keeps_the_numbers(tmp_path,
                                                                       tiny_checkpoint):
    rows = [{"id": f"s{i}", "text": " ".join(WORDS[: 2 + i])} for i in range(4)]
    _, full = _run(tmp_path, "full", tiny_checkpoint, rows, entropy=True, top_logprobs=2)
    _, lean = _run(tmp_path, "lean", tiny_checkpoint, rows, entropy=True, top_logprobs=2,
                   summary_only=True)
    per_token = {"token_ids", "token_logprobs", "greedy", "top_token_ids", "top_logprobs",
                 "entropy"}
    for key, row in lean.items():
        assert not per_token & set(row)
        assert row == {k: v for k, v in full[key].items() if k not in per_token}


@pytest.mark.parametrize("record, reason", [
    ({"choices": "not a list"}, "is a string, not a list of strings"),
    ({"choices": [1, 2]}, "must be a list of strings"),
    ({"choices": []}, "is an empty list"),
    ({"choices": ["a", ""]}, "choice 1 in field 'choices' is an empty string"),
    ({"choices": ["a", "b"], "label": 2}, "out of range for 2 choices"),
    ({"choices": ["a", "b"], "label": "first"}, "expected the index of a choice"),
    ({"choices": ["a", "b"], "label": True}, "expected the index of a choice"),
    ({"choices": ["a", "b"]}, "expected the index of a choice"),  # no label
])
def test_bad_multiple_choice_records_are_error_rows(tmp_path, tiny_checkpoint, record, reason):
    good = {"id": "ok", "ctx": "Pick one:", "choices": ["yes", "no"], "label": 0}
    bad = {"id": "bad", "ctx": "Pick one:", **record}
    summary, got = _run(tmp_path, "bad", tiny_checkpoint, [good, bad], context_field="ctx",
                        choices_field="choices", label_field="label")
    assert list(got) == ["ok"] and summary.reconciled and summary.error_records == 1
    (error,) = read_output(errors_path(str(tmp_path / "bad")))
    assert error["id"] == "bad" and reason in error["reason"]


@pytest.mark.parametrize("options, message", [
    (dict(choices_field="choices"), "choices_field needs context_field"),
    (dict(label_field="label"), "label_field needs choices_field"),
    (dict(top_logprobs=0), "top_logprobs must be in 1..20"),
    (dict(top_logprobs=21), "top_logprobs must be in 1..20"),
    (dict(context_field="ctx", choices_field="choices", entropy=True), "per-token columns"),
])
def test_bad_options_are_refused_before_any_data_is_read(options, message):
    with pytest.raises(ValueError, match=message):
        JobConfig(input="x.jsonl", output="o", **options)


@pytest.mark.parametrize("value", ["0", "21"])
def test_cli_refuses_top_logprobs_out_of_range(value):
    from click.testing import CliRunner

    from pipeline import cli

    result = CliRunner().invoke(cli.main, ["score", "--input", "i", "--output", "o",
                                           "--top-logprobs", value])
    assert result.exit_code == 2 and "--top-logprobs" in result.stderr
