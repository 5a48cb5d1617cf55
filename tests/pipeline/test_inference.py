"""The ModelHandlers in a user's own pipeline: RunInference on the DirectRunner gives the same
numbers as our jobs, and as transformers."""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that
from conftest import beam_matcher

from pipeline import GPT2GenerationModelHandler, GPT2ScoringModelHandler, jobs
from pipeline.config import JobConfig
from pipeline.writers import read_output

TEXTS = ["The Manhattan bridge", "Once upon a time there was a river",
         "river stone " * 60, "naïve café"]  # the third needs rolling windows (context 64)


def test_scoring_handler_equals_the_job_and_transformers(tmp_path, tiny_checkpoint):
    import torch
    import transformers

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    jobs.run(JobConfig(input=str(src), output=str(tmp_path / "job"), model=str(tiny_checkpoint),
                       progress=False))
    want = {r["id"]: r for r in read_output(str(tmp_path / "job"))}
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()

    def check(results):
        assert [r.example for r in results] == TEXTS or sorted(
            r.example for r in results) == sorted(TEXTS)
        for r in results:
            i = TEXTS.index(r.example)
            job_row = want[f"in.jsonl:{i}"]
            got = r.inference
            assert got.error is None and got.token_ids == job_row["token_ids"]
            np.testing.assert_allclose(got.token_logprobs, job_row["token_logprobs"],
                                       atol=1e-5)
            assert got.perplexity == pytest.approx(job_row["perplexity"], rel=1e-5)
            if len(got.token_ids) < 60:  # one window: transformers over <|endoftext|> + text
                ids = torch.tensor([[50256] + got.token_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(ref(ids).logits[0, :-1].double(), -1)
                picked = logp[torch.arange(len(got.token_ids)), ids[0, 1:]].numpy()
                np.testing.assert_allclose(got.token_logprobs, picked, atol=1e-4)

    with BeamTestPipeline() as p:
        out = (p | beam.Create(TEXTS)
               | RunInference(GPT2ScoringModelHandler(str(tiny_checkpoint))))
        assert_that(out, beam_matcher(check))


def test_generation_handler_equals_the_job(tmp_path, tiny_checkpoint):
    prompts = ["Once upon a time", "The river"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                           for i, t in enumerate(prompts)))
    settings = dict(max_new_tokens=5, temperature=0.8, seed=3, num_samples=2)
    jobs.run(JobConfig(mode="generate", input=str(src), output=str(tmp_path / "g"),
                       model=str(tiny_checkpoint), id_field="id", progress=False, **settings))
    want = {(r["id"], r["sample_index"]): r["token_ids"] for r in read_output(
        str(tmp_path / "g"))}

    def check(results):
        for r in results:
            record_id = r.example["id"]
            assert [g.sample_index for g in r.inference] == [0, 1]
            for g in r.inference:
                assert g.error is None and g.token_ids == want[(record_id, g.sample_index)]

    with BeamTestPipeline() as p:
        out = (p | beam.Create([{"id": f"p{i}", "prompt": t} for i, t in enumerate(prompts)])
               | RunInference(GPT2GenerationModelHandler(str(tiny_checkpoint), id_field="id",
                                                         **settings)))
        assert_that(out, beam_matcher(check))


def test_bad_elements_and_exception_handling(tiny_checkpoint):
    def check(results):
        by_example = {json.dumps(r.example, sort_keys=True, default=str): r.inference
                      for r in results}
        bad = by_example[json.dumps({"text": 12})]
        assert bad.error and "is a int" in bad.error
        assert by_example[json.dumps("fine text")].error is None

    with BeamTestPipeline() as p:
        main, failed = (p | beam.Create(["fine text", {"text": 12}])
                        | RunInference(GPT2ScoringModelHandler(str(tiny_checkpoint)))
                        .with_exception_handling())
        assert_that(main, beam_matcher(check))
        assert_that(failed.failed_inferences, beam_matcher(lambda xs: xs == []), label="NoFails")


def test_beam_batches_weigh_real_tokens(tiny_checkpoint):
    """Beam's batches are weighed by the model's own token counts and fixed in size (Beam's
    adaptive sizing would start at single elements, each a padded model call); the size
    function pickles without its tokenizer, which each worker loads on first use."""
    import pickle

    from gpt2model import get_tokenizer

    handler = GPT2ScoringModelHandler(str(tiny_checkpoint), max_tokens_per_batch=512)
    kwargs = handler.batch_elements_kwargs()
    assert kwargs["min_batch_size"] == kwargs["max_batch_size"] == 4 * 512
    size = pickle.loads(pickle.dumps(kwargs["element_size_fn"]))
    tokenizer = get_tokenizer(str(tiny_checkpoint))
    assert [size(t) for t in TEXTS] == [len(tokenizer.encode(t)) for t in TEXTS]
    assert size({"text": "The Manhattan bridge", "id": "a b c"}) == 3 + len(
        tokenizer.encode("a b c"))
    assert b"Tokenizer" not in pickle.dumps(size)
    own = GPT2ScoringModelHandler(str(tiny_checkpoint), max_batch_size=100).batch_elements_kwargs()
    assert (own["min_batch_size"], own["max_batch_size"]) == (100, 100)
    with pytest.raises(ValueError, match="--revision applies to Hub models"):
        GPT2ScoringModelHandler(str(tiny_checkpoint), revision="main")
