"""The generate job's controls and beam search, end to end, against transformers.generate.

A job over a JSONL file of prompts (the real Beam runner, Parquet out) must give the tokens
`transformers.GPT2LMHeadModel.generate` gives with the same settings; bad settings are refused
before any data is read, naming the option.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, write_hf_checkpoint

from gpt2model import get_tokenizer
from pipeline import cli, jobs
from pipeline.config import JobConfig
from pipeline.writers import read_output

EOS = 50256
PROMPTS = ["The river", "A quiet market in winter", "Seven", "North of the glass stone",
           "light paper light paper light"]


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory) -> Path:
    """The tiny model with large random weights: peaked distributions, so greedy choices have
    clear margins (no float32 near-ties between us and torch) and repeat themselves."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("sharp"), seed=3,
                               **{**TINY, "initializer_range": 0.4})


@pytest.fixture(scope="module")
def ref(sharp_checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(sharp_checkpoint).eval()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


def _job(tmp_path, checkpoint, prompts_file, name="out", **options) -> list[dict]:
    cfg = JobConfig(mode="generate", input=str(prompts_file), output=str(tmp_path / name),
                    model=str(checkpoint), id_field="id", progress=False, **options)
    jobs.run(cfg)
    return sorted(read_output(cfg.output), key=lambda r: (r["id"], r["sample_index"]))


def _hf(ref, checkpoint, **kwargs) -> list[list[list[int]]]:
    """transformers.generate, one prompt at a time (no padding): [prompt][sequence] ids,
    eos cut."""
    tok = get_tokenizer(str(checkpoint))
    out = []
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            seqs = ref.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=EOS,
                                eos_token_id=EOS, do_sample=False, **kwargs)
        rows = []
        for s in seqs[:, ids.shape[1]:].tolist():
            rows.append(s[:s.index(EOS)] if EOS in s else s)
        out.append(rows)
    return out


CONTROLS = [
    dict(repetition_penalty=1.8),
    dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=4, logit_bias=((EOS, 30.0), (47499, -5.0))),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3, logit_bias=((262, 2.0),)),
]


@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: ",".join(c))
def test_greedy_with_controls_is_transformers_generate(tmp_path, sharp_checkpoint, ref,
                                                       prompts_file, controls):
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, max_new_tokens=10, **controls)
    hf_kwargs = {k: v for k, v in controls.items() if k != "logit_bias"}
    if "logit_bias" in controls:
        hf_kwargs["sequence_bias"] = {(t,): b for t, b in controls["logit_bias"]}
    want = _hf(ref, sharp_checkpoint, max_new_tokens=10, **hf_kwargs)
    plain = _hf(ref, sharp_checkpoint, max_new_tokens=10)
    assert [r["token_ids"] for r in rows] == [w[0] for w in want]
    assert want != plain  # the control changed something


def test_bad_words_ban_both_spellings(tmp_path, sharp_checkpoint, prompts_file):
    plain = _job(tmp_path, sharp_checkpoint, prompts_file, "plain", max_new_tokens=10)
    tok = get_tokenizer(str(sharp_checkpoint))
    # The word the model produces most often, after a space.
    counts = np.bincount([t for r in plain for t in r["token_ids"]], minlength=50257)
    word = tok.decode([int(counts.argmax())]).strip()
    assert word
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, "banned", max_new_tokens=10,
                bad_words=(word,))
    banned = {tuple(tok.encode(word)), tuple(tok.encode(" " + word))}
    for r in rows:
        ids = r["token_ids"]
        for b in banned:
            assert not any(tuple(ids[i:i + len(b)]) == b for i in range(len(ids))), (word, r)
    assert rows != plain


def test_stop_token_ids_end_a_row(tmp_path, sharp_checkpoint, prompts_file):
    plain = _job(tmp_path, sharp_checkpoint, prompts_file, "plain", max_new_tokens=8)
    stop = plain[0]["token_ids"][2]
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, "stopped", max_new_tokens=8,
                stop_token_ids=(stop,))
    assert rows[0]["finish_reason"] == "stop_token"
    assert rows[0]["token_ids"] == plain[0]["token_ids"][:plain[0]["token_ids"].index(stop)]
    for r in rows:
        assert stop not in r["token_ids"]


@pytest.mark.parametrize("beams, returned, penalty, early", [(3, 2, 1.0, False),
                                                            (4, 4, 0.5, True)])
def test_beam_search_is_transformers_generate(tmp_path, sharp_checkpoint, ref, prompts_file,
                                              beams, returned, penalty, early):
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, max_new_tokens=6, num_beams=beams,
                num_return_sequences=returned, length_penalty=penalty, early_stopping=early)
    want = _hf(ref, sharp_checkpoint, max_new_tokens=6, num_beams=beams,
               num_return_sequences=returned, length_penalty=penalty, early_stopping=early)
    got = [[r["token_ids"] for r in rows if r["id"] == f"p{i}"] for i in range(len(PROMPTS))]
    assert got == want
    assert all(isinstance(r["sequence_score"], float) for r in rows)
    for i in range(len(PROMPTS)):  # best first
        scores = [r["sequence_score"] for r in rows if r["id"] == f"p{i}"]
        assert scores == sorted(scores, reverse=True)


def test_beam_scores_are_transformers_sequences_scores(tmp_path, sharp_checkpoint, ref,
                                                       prompts_file):
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, max_new_tokens=5, num_beams=3,
                num_return_sequences=3)
    tok = get_tokenizer(str(sharp_checkpoint))
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=EOS,
                               eos_token_id=EOS, do_sample=False, num_beams=3,
                               num_return_sequences=3, max_new_tokens=5, output_scores=True,
                               return_dict_in_generate=True)
        got = [r["sequence_score"] for r in rows if r["id"] == f"p{i}"]
        np.testing.assert_allclose(got, out.sequences_scores.numpy(), atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--presence-penalty", "3"], "--presence-penalty"),
    (["--logit-bias", "13:lots"], "ID:BIAS"),
    (["--logit-bias", "60000:1"], "outside the model's vocabulary"),
    (["--stop-token-ids", "99999"], "outside the model's vocabulary"),
    (["--top-logprobs", "21"], "--top-logprobs"),
    (["--top-logprobs", "0"], "--top-logprobs"),
    (["--bad-words", " ,x"], None),  # a blank item is dropped; "x" is a fine word
    (["--bad-words", "\u200b"], None),
    (["--num-beams", "3", "--temperature", "0.7"], "does not combine with temperature"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
    (["--num-return-sequences", "2"], "num_return_sequences must be in 1..num_beams (1)"),
    (["--early-stopping"], "beam search settings"),
    (["--num-beams", "2", "--num-samples", "2"], "num_samples"),
])
def test_bad_settings_are_refused_before_any_data_is_read(tmp_path, sharp_checkpoint,
                                                          prompts_file, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, ["generate", "--input", str(prompts_file), "--output",
                                           str(out), "--model", str(sharp_checkpoint),
                                           "--no-progress", *args], prog_name="gpt2-pipeline")
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert not out.exists()


def test_a_bad_word_that_tokenizes_to_nothing_is_refused(tmp_path, sharp_checkpoint,
                                                         prompts_file):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        _job(tmp_path, sharp_checkpoint, prompts_file, bad_words=(" ",))
    assert not (tmp_path / "out").exists()


def test_top_logprobs_and_echo_columns(tmp_path, sharp_checkpoint, prompts_file):
    rows = _job(tmp_path, sharp_checkpoint, prompts_file, "gen", max_new_tokens=5,
                top_logprobs=3, echo=True)
    score_in = tmp_path / "texts.jsonl"
    score_in.write_text("".join(json.dumps({"id": f"p{i}", "text": p}) + "\n"
                                for i, p in enumerate(PROMPTS)))
    jobs.run(JobConfig(input=str(score_in), output=str(tmp_path / "scored"), id_field="id",
                       model=str(sharp_checkpoint), add_bos=False, progress=False))
    scored = {r["id"]: r for r in read_output(str(tmp_path / "scored"))}
    for r in rows:
        assert len(r["top_token_ids"]) == len(r["top_logprobs"]) == len(r["token_ids"])
        for ids, lps, token, lp in zip(r["top_token_ids"], r["top_logprobs"], r["token_ids"],
                                       r["token_logprobs"], strict=True):
            assert len(ids) == 3 and ids[0] == token  # greedy: the chosen one is the top one
            assert lps == sorted(lps, reverse=True)
            np.testing.assert_allclose(lps[0], lp, atol=1e-5)
        echo = r["prompt_token_logprobs"]
        assert echo[0] is None
        # The prompt's own log-probs are what a score job (no bos) gives the same text.
        if len(echo) == 1:  # a one-token prompt: nothing for a score job without bos
            assert r["id"] not in scored
            continue
        want = scored[r["id"]]["token_logprobs"]
        assert len(echo) == len(want) and want[0] is None
        np.testing.assert_allclose(echo[1:], want[1:], atol=1e-5)
