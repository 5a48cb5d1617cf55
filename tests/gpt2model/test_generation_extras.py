"""Generation extras: per-token top-K alternatives, prompt log-probs (echo), and one prefill per
distinct prompt for the samples of a record.

References are transformers' GPT2LMHeadModel: a forward pass over prompt + generated tokens
(log_softmax of its raw logits, torch.topk) and over the prompt alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from gpt2model import Generator, Sample, SamplingConfig, from_pretrained, get_tokenizer
from gpt2model.batching import left_pad, plan_prefill
from gpt2model.generation import record_seed

EOS = 50256
PROMPTS = ["The Manhattan bridge", "Hello", "In 1905, Albert Einstein published four papers",
           "def f(x):"]
GREEDY = SamplingConfig(max_new_tokens=16)
SAMPLE = SamplingConfig(max_new_tokens=16, temperature=1.0)
FIXED = dict(batch_size=4, prompt_length=8)  # one shape for most calls: compiles are the cost


@pytest.fixture(scope="module")
def ckpt(lively_checkpoint):
    return lively_checkpoint


@pytest.fixture(scope="module")
def gen(ckpt) -> Generator:
    return Generator(*from_pretrained(ckpt), get_tokenizer(ckpt))


@pytest.fixture(scope="module")
def ref(ckpt) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def prompt_ids(gen) -> list[list[int]]:
    return [gen.tokenizer.encode(p) for p in PROMPTS]


def hf_logprobs(ref, ids: list[int]) -> np.ndarray:
    """transformers' log_softmax of the logits over `ids` alone [T, V] (float64 of float32)."""
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def assert_top_k_matches(ref, prompt: list[int], g, k: int) -> None:
    """g's top-K at each generated position equal torch.topk of transformers' distribution."""
    assert len(g.top_token_ids) == len(g.top_logprobs) == len(g.token_ids)
    logps = hf_logprobs(ref, prompt + g.token_ids)[len(prompt) - 1:-1]  # [n, V]
    values, ids = torch.topk(torch.from_numpy(logps), k, dim=-1)
    np.testing.assert_array_equal(g.top_token_ids, ids.numpy())
    np.testing.assert_allclose(g.top_logprobs, values.numpy(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ top_logprobs


def test_top_logprobs_equal_transformers_topk(gen, ref, prompt_ids):
    settings = dataclasses.replace(GREEDY, top_logprobs=5)
    out = [g[0] for g in gen.generate(prompt_ids, settings=settings, **FIXED)]
    plain = [g[0] for g in gen.generate(prompt_ids, settings=GREEDY, **FIXED)]
    for p, g, base in zip(prompt_ids, out, plain, strict=True):
        assert (g.token_ids, g.logprobs) == (base.token_ids, base.logprobs)  # nothing else moves
        assert base.top_token_ids is None and base.top_logprobs is None
        assert len(g.token_ids) == 16
        assert_top_k_matches(ref, p, g, 5)
        assert all(row == sorted(row, reverse=True) for row in g.top_logprobs)


def test_top_logprobs_are_the_raw_distribution_under_processors(gen, ref, prompt_ids):
    """With a repetition penalty the chosen token is not always the raw top one; the top-K
    stay the model's own distribution, as the reported log-probs do."""
    settings = SamplingConfig(max_new_tokens=16, repetition_penalty=3.0, top_logprobs=3)
    out = [g[0] for g in gen.generate(prompt_ids, settings=settings, **FIXED)]
    off_top = 0
    for p, g in zip(prompt_ids, out, strict=True):
        assert_top_k_matches(ref, p, g, 3)
        off_top += sum(t != top[0] for t, top in zip(g.token_ids, g.top_token_ids, strict=True))
    assert off_top >= 1


def test_top_logprobs_one_is_the_greedy_token_and_cut_with_it(gen, prompt_ids):
    settings = dataclasses.replace(GREEDY, top_logprobs=1)
    out = [g[0] for g in gen.generate(prompt_ids, settings=settings, **FIXED)]
    for g in out:
        assert g.top_token_ids == [[t] for t in g.token_ids]
        np.testing.assert_allclose([x[0] for x in g.top_logprobs], g.logprobs, rtol=0, atol=1e-6)
    full = out[2]
    stop = gen.tokenizer.decode(full.token_ids[6:8]).strip()
    assert len(stop) >= 2 and stop not in gen.tokenizer.decode(full.token_ids[:6])
    cut = gen.generate(prompt_ids, settings=settings, stop=[stop], **FIXED)[2][0]
    assert cut.finish_reason == "stop" and 6 < len(cut.token_ids) < 16
    assert cut.top_token_ids == full.top_token_ids[:len(cut.token_ids)]
    assert cut.top_logprobs == full.top_logprobs[:len(cut.token_ids)]


# -------------------------------------------------------------------------------- echo


def test_prompt_logprobs_equal_transformers_for_packed_prompts(gen, ref):
    """Prompts of several lengths (one of a single token, one repeated) packed in one prefill:
    each prompt token's log-prob equals transformers' on the prompt alone."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (1, 5, 8, 3, 7)]
    prompts.append(prompts[2])
    settings = dataclasses.replace(GREEDY, echo=True)
    out = [g[0] for g in gen.generate(prompts, settings=settings, batch_size=6, prompt_length=8)]
    plain = [g[0] for g in gen.generate(prompts, settings=GREEDY, batch_size=6, prompt_length=8)]
    for p, g, base in zip(prompts, out, plain, strict=True):
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(p)
        want = hf_logprobs(ref, p)[np.arange(len(p) - 1), p[1:]]
        np.testing.assert_allclose(g.prompt_logprobs[1:], want, rtol=0, atol=1e-5)
        assert base.prompt_logprobs is None
        assert dataclasses.replace(g, prompt_logprobs=None) == base
    assert out[5].prompt_logprobs == out[2].prompt_logprobs


# --------------------------------------------------------------- one prefill per prompt


def test_plan_prefill_packs_a_repeated_prompt_once():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50000, 6).tolist(), rng.integers(0, 50000, 3).tolist()
    ids, mask = left_pad([a, b, a, a, b], 8, 5, EOS)
    ids[2, :2] = 7  # padding ids take no part in the comparison
    plan = plan_prefill(ids, mask, EOS, same_as=[0, 1, 0, 0, 1])
    assert np.count_nonzero(plan.segments) == len(a) + len(b)
    assert sorted(set(plan.segments[plan.segments > 0].tolist())) == [1, 2]
    for r in (2, 3):
        assert (plan.row[r], plan.start[r]) == (plan.row[0], plan.start[0])
    assert (plan.row[4], plan.start[4]) == (plan.row[1], plan.start[1])
    np.testing.assert_array_equal(plan.lengths, [6, 3, 6, 6, 3])
    # Unplanned, every row is its own prompt, repeated or not.
    assert np.count_nonzero(plan_prefill(ids, mask, EOS).segments) == 3 * len(a) + 2 * len(b)
    for bad in ([0, 0, 0, 0, 1], [0, 1, 3, 0, 1], [0, 1, 0, 0]):
        with pytest.raises(ValueError, match="same_as"):
            plan_prefill(ids, mask, EOS, same_as=bad)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLE], ids=["greedy", "sampled"])
def test_samples_of_one_prompt_prefill_once_with_the_same_results(gen, prompt_ids, settings):
    """8 samples of one prompt: one prompt prefilled, every sample as when generated alone and
    as when each row is prefilled for itself (the unshared plan). Tokens are identical;
    log-probs agree to float32 rounding (another packing sums in another order)."""
    prompt = tuple(prompt_ids[2])
    samples = [Sample("rec", i, prompt) for i in range(8)]
    together = gen.run_batch(samples, settings, seed=7, length=8, rows=8)
    assert gen.last_prefill_rows == 1 and gen.last_prefill_tokens == len(prompt)
    ids, mask = left_pad([prompt] * 8, 8, 8, EOS)
    unshared = gen.decode(ids, mask, np.stack([record_seed(7, "rec", i) for i in range(8)]),
                          settings)
    assert gen.last_prefill_rows == 8
    for r, (s, g) in enumerate(zip(samples, together, strict=True)):
        alone = gen.run_batch([s], settings, seed=7, length=8, rows=8)[0]
        assert gen.last_prefill_rows == 2  # the prompt and the padding rows' one-token prompt
        assert alone.token_ids == g.token_ids and alone.finish_reason == g.finish_reason
        np.testing.assert_allclose(alone.logprobs, g.logprobs, rtol=0, atol=1e-5)
        n = len(g.token_ids)  # the whole row unless it ended
        assert unshared["tokens"][r, :n].tolist() == g.token_ids
        np.testing.assert_allclose(unshared["logprobs"][r, :n], g.logprobs, rtol=0, atol=1e-5)
    distinct = {tuple(g.token_ids) for g in together}
    assert len(distinct) == (1 if settings.greedy else 8)


def test_num_samples_of_several_prompts_prefill_each_prompt_once(gen, prompt_ids):
    out = gen.generate(prompt_ids[:3], settings=SAMPLE, seed=7, keys=["a", "b", "c"],
                       num_samples=2, batch_size=6, prompt_length=8)
    assert gen.last_prefill_rows == 3
    assert gen.last_prefill_tokens == sum(len(p) for p in prompt_ids[:3])
    single = gen.generate(prompt_ids, settings=SAMPLE, seed=7, keys=["a", "b", "c", "d"],
                          **FIXED)
    assert [x[0].token_ids for x in out] == [x[0].token_ids for x in single[:3]]


# ------------------------------------------------------------------ settings, compiles


@pytest.mark.parametrize("changes", [
    dict(top_logprobs=-1), dict(top_logprobs=21), dict(top_logprobs=1.5),
    dict(top_logprobs=True), dict(echo=1), dict(echo="yes"),
])
def test_bad_settings_raise(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        SamplingConfig(**changes)


def test_good_settings():
    assert SamplingConfig().top_logprobs == 0 and SamplingConfig().echo is False
    assert SamplingConfig(top_logprobs=20, echo=True).top_logprobs == 20


def test_top_logprobs_and_echo_select_programs_stop_strings_do_not(gen, prompt_ids):
    settings = SamplingConfig(max_new_tokens=12)
    gen.generate(prompt_ids, settings=settings, **FIXED)
    count = gen.compile_count
    gen.generate(prompt_ids, settings=settings, stop=["xyz"], **FIXED)
    assert gen.compile_count == count
    top = dataclasses.replace(settings, top_logprobs=2)
    gen.generate(prompt_ids, settings=top, **FIXED)
    assert gen.compile_count == count + 1  # a decode loop; the prefill is the same
    gen.generate(prompt_ids, settings=top, stop=["abc"], **FIXED)
    assert gen.compile_count == count + 1
    gen.generate(prompt_ids, settings=dataclasses.replace(settings, echo=True), **FIXED)
    assert gen.compile_count == count + 2  # a prefill; the decode loop is the same
    gen.generate(prompt_ids, settings=dataclasses.replace(top, echo=True), **FIXED)
    assert gen.compile_count == count + 2
