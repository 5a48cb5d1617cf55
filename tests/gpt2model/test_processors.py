"""Logits processors against their references: transformers' LogitsProcessor objects, built
directly and fed torch tensors, and vLLM's presence/frequency formula in numpy.

Histories are random, left-padded with a pad id that also occurs as a real token (so a pad that
counted would show), and drawn from a few ids so repeats, n-grams and bad-word prefixes occur.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from gpt2model import SamplingConfig
from gpt2model.processors import (
    History,
    apply,
    bad_words,
    filter_logits,
    greedy_token,
    logit_bias,
    min_new_tokens,
    min_p,
    no_repeat_ngram,
    presence_frequency_penalty,
    repetition_penalty,
)

V = 48  # vocabulary of the random logits
EOS = V - 1
STOP = (V - 2, V - 3)
PAD = 2  # also a common real token
P, N = 7, 9  # prompt slots and new-token slots
LENGTHS = (7, 4, 1, 5)  # real prompt tokens per row


def make_history(seed: int, steps: int, high: int = 5, pad: int = PAD):
    """A History after `steps` generated tokens, and each row's real tokens (prompt + output)."""
    rng = np.random.default_rng(seed)
    prompt = np.full((len(LENGTHS), P), pad, np.int32)
    valid = np.zeros(prompt.shape, bool)
    for r, n in enumerate(LENGTHS):
        prompt[r, P - n:] = rng.integers(0, high, n)
        valid[r, P - n:] = True
    history = History.start(jnp.asarray(prompt), jnp.asarray(valid), N, (EOS, *STOP))
    generated = rng.integers(0, high, (len(LENGTHS), steps)).astype(np.int32)
    for s in range(steps):
        history = history.append(jnp.asarray(generated[:, s]), jnp.ones(len(LENGTHS), bool))
    rows = [[*prompt[r, P - n:].tolist(), *generated[r].tolist()] for r, n in enumerate(LENGTHS)]
    return history, rows, generated


def random_logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    return (rng.standard_normal((len(LENGTHS), V)) * 3).astype(np.float32)


def per_row(processor, rows, logits: np.ndarray) -> np.ndarray:
    """A transformers processor run on each row's real tokens alone (no padding)."""
    return np.concatenate([processor(torch.tensor([row]), torch.from_numpy(logits[r:r + 1]))
                           .numpy() for r, row in enumerate(rows)])


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


STEPS = [0, 1, 6]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_matches_transformers(steps, penalty):
    """As `generate` builds it: the left-padded batch, the padding ignored per row."""
    history, _, generated = make_history(steps, steps)
    logits = random_logits(steps)
    ids = torch.from_numpy(np.concatenate([np.asarray(history.ids[:, :P]), generated], 1))
    pads = torch.tensor([P - n for n in LENGTHS])
    want = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(
        ids.long(), torch.from_numpy(logits.copy())).numpy()
    close(repetition_penalty(jnp.asarray(logits), history, penalty), want)
    assert not np.allclose(want, logits)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(steps, n):
    history, rows, _ = make_history(10 + steps, steps, high=3)
    logits = random_logits(n)
    want = per_row(hf.NoRepeatNGramLogitsProcessor(n), rows, logits)
    close(no_repeat_ngram(jnp.asarray(logits), history, n), want)
    if steps == 6 and n <= 2:
        assert np.isinf(want).any()


@pytest.mark.parametrize("steps", [0, 2, 3, 5])
def test_min_new_tokens_matches_transformers(steps):
    """eos and the stop ids are suppressed until 3 tokens are generated."""
    history, _, _ = make_history(20, steps)
    logits = random_logits(steps)
    ids = torch.zeros((len(LENGTHS), P + steps), dtype=torch.long)  # only its length counts
    want = hf.MinNewTokensLengthLogitsProcessor(P, 3, [EOS, *STOP])(
        ids, torch.from_numpy(logits)).numpy()
    close(min_new_tokens(jnp.asarray(logits), history, 3), want)
    assert np.isinf(want).sum() == (len(LENGTHS) * 3 if steps < 3 else 0)


WORDS = [(4,), (EOS,), (STOP[0],), (1, 3), (0, 0, 2), (PAD, 1), (3, 1, 0, 4), (2, 2, 2, 2, 2, 2)]


@pytest.mark.parametrize("steps", STEPS)
def test_bad_words_match_transformers(steps):
    """Single tokens, prefixes ending in the prompt or the output, one longer than some rows'
    context; one-token words that are an end id are dropped, as transformers does."""
    history, rows, _ = make_history(30 + steps, steps, high=4)
    logits = random_logits(steps)
    processor = hf.NoBadWordsLogitsProcessor([list(w) for w in WORDS], [EOS, *STOP])
    want = per_row(processor, rows, logits)
    close(bad_words(jnp.asarray(logits), history, WORDS), want)
    assert np.isinf(want).any() and np.isfinite(want[:, EOS]).all()


def test_logit_bias_matches_sequence_bias():
    pairs = ((0, 2.5), (7, -100.0), (EOS, -1.25), (13, float("-inf")))
    logits = random_logits(0)
    processor = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in pairs])
    want = processor(torch.zeros((4, 3), dtype=torch.long), torch.from_numpy(logits)).numpy()
    close(logit_bias(jnp.asarray(logits), pairs), want)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(fraction):
    logits = random_logits(5)
    want = hf.MinPLogitsWarper(fraction)(None, torch.from_numpy(logits)).numpy()
    close(min_p(jnp.asarray(logits), fraction), want)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "fraction"), [
    (0.7, 10, 0.9, 0.1), (1.5, 0, 0.8, 0.2), (1.0, 5, 1.0, 0.0), (0.5, 30, 0.95, 0.05)])
def test_warpers_match_transformers_in_order_on_banned_logits(temperature, top_k, top_p,
                                                              fraction):
    """Temperature, top-k, top-p, min-p on logits a processor has already set to -inf in part:
    top-k must not count the banned entries."""
    logits = random_logits(7)
    logits[:, ::3] = -np.inf
    chain = [hf.TemperatureLogitsWarper(temperature)]
    chain += [hf.TopKLogitsWarper(top_k)] if top_k else []
    chain += [hf.TopPLogitsWarper(top_p)] if top_p < 1 else []
    chain += [hf.MinPLogitsWarper(fraction)] if fraction else []
    want = transformers.LogitsProcessorList(chain)(None, torch.from_numpy(logits)).numpy()
    settings = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=fraction)
    close(jax.jit(filter_logits, static_argnums=1)(jnp.asarray(logits), settings), want)


def vllm_penalties(logits: np.ndarray, generated: np.ndarray, presence: float, frequency: float):
    """vLLM's `apply_penalties` without the repetition part: output tokens only."""
    counts = np.zeros(logits.shape, np.int64)
    for r, row in enumerate(generated):
        np.add.at(counts[r], row, 1)
    return logits - frequency * counts - presence * (counts > 0)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(("presence", "frequency"), [(0.7, 0.0), (0.0, 0.4), (1.5, -0.6),
                                                     (-2.0, 2.0)])
def test_presence_frequency_penalties_match_vllm_formula(steps, presence, frequency):
    """The prompt never counts (PAD and the prompts' ids are all in the output's range)."""
    history, _, generated = make_history(40 + steps, steps)
    logits = random_logits(steps)
    want = vllm_penalties(logits, generated, presence, frequency)
    close(presence_frequency_penalty(jnp.asarray(logits), history, presence, frequency), want)


class VllmPenalties(transformers.LogitsProcessor):
    """presence/frequency penalties as a transformers processor (tokens after the prompt)."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_length:].numpy()
        return torch.from_numpy(vllm_penalties(scores.numpy(), out, self.presence,
                                               self.frequency).astype(np.float32))


ALL = dict(logit_bias=((1, 1.5), (3, -0.5), (9, 4.0)), repetition_penalty=1.4,
           presence_penalty=0.5, frequency_penalty=0.3, no_repeat_ngram_size=2,
           bad_words_ids=((4,), (0, 1), (1, 2, 3)), min_new_tokens=4, stop_token_ids=STOP)


def transformers_processors(settings: SamplingConfig, steps: int):
    """The processor list transformers' own `_get_logits_processor` builds for these settings
    (presence/frequency as a custom processor, which it puts after its own processors)."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=V, n_positions=32, eos_token_id=EOS,
        bos_token_id=EOS))
    config = transformers.GenerationConfig(
        do_sample=not settings.greedy, temperature=settings.temperature or None,
        top_k=settings.top_k or None, top_p=settings.top_p, min_p=settings.min_p or None,
        repetition_penalty=settings.repetition_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        min_new_tokens=settings.min_new_tokens,
        bad_words_ids=[list(w) for w in settings.bad_words_ids],
        sequence_bias=[[[t], b] for t, b in settings.logit_bias],
        eos_token_id=[EOS, *settings.stop_token_ids], pad_token_id=EOS)
    model._prepare_special_tokens(config, True, device="cpu")
    mask = torch.tensor([[0] * (P - n) + [1] * (n + steps) for n in LENGTHS])
    return model._get_logits_processor(
        config, input_ids_seq_length=P, model_kwargs={"attention_mask": mask},
        logits_processor=transformers.LogitsProcessorList([VllmPenalties(
            settings.presence_penalty, settings.frequency_penalty, P)]))


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("sampling", [
    {}, dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)], ids=["greedy", "sampling"])
def test_apply_matches_the_list_transformers_builds(steps, sampling):
    """Every control at once: `apply` equals transformers' own processor list, run on the
    left-padded batch as `generate` runs it (the order matters: bias and the repetition
    penalty do not commute). The pad id here is no real token: transformers' n-gram and
    bad-word processors read pad slots as tokens, ours never do."""
    settings = SamplingConfig(**ALL, **sampling)
    history, _, generated = make_history(50 + steps, steps, pad=EOS)
    logits = random_logits(steps)
    ids = torch.from_numpy(np.concatenate([np.asarray(history.ids[:, :P]), generated], 1))
    processors = transformers_processors(settings, steps)
    names = [type(p).__name__ for p in processors]
    assert names[:6] == ["SequenceBiasLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
                         "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
                         "MinNewTokensLengthLogitsProcessor", "VllmPenalties"]
    assert names[6:] == (["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                          "MinPLogitsWarper"] if sampling else [])
    want = processors(ids.long(), torch.from_numpy(logits.copy())).numpy()
    got = jax.jit(apply, static_argnums=2)(jnp.asarray(logits), history, settings)
    close(got, want)


def test_controls_that_are_off_trace_to_nothing():
    history, _, _ = make_history(0, 2)
    jaxpr = jax.make_jaxpr(lambda x: apply(x, history, SamplingConfig(max_new_tokens=4)))(
        jnp.zeros((len(LENGTHS), V)))
    assert not jaxpr.eqns


def test_token_ids_outside_the_vocabulary_are_refused():
    history, _, _ = make_history(0, 1)
    with pytest.raises(ValueError, match=r"\[48, 60\].*vocabulary of 48"):
        apply(jnp.zeros((len(LENGTHS), V)), history,
              SamplingConfig(bad_words_ids=((1, 60),), logit_bias=((48, 1.0),)))


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=-1.2), "repetition_penalty must be > 0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size must be an integer"),
    (dict(min_new_tokens=-3), "min_new_tokens must be an integer >= 0"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(bad_words_ids=((1, 2), ())), "a bad word is empty"),
    (dict(bad_words_ids=(1, 2)), "bad_words_ids must be a tuple of token-id tuples"),
    (dict(bad_words_ids=((1, "2"),)), "non-negative integer token ids"),
    (dict(bad_words_ids=((1.0,),)), "non-negative integer token ids"),
    (dict(bad_words_ids=((-1,),)), "non-negative integer token ids"),
    (dict(stop_token_ids=(5, True)), "stop_token_ids must be a tuple of non-negative integer"),
    (dict(stop_token_ids=7), "stop_token_ids must be a tuple"),
    (dict(logit_bias=((3, 1.0), (3, 2.0))), "appears twice"),
    (dict(logit_bias=((3.5, 1.0),)), "token id 3.5 is not a non-negative integer"),
    (dict(logit_bias=((3, "x"),)), "must be a number"),
    (dict(logit_bias=((3, 1.0, 2.0),)), r"\(token id, bias\) pairs"),
])
def test_bad_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_list_settings_become_tuples_and_hash_alike():
    listed = SamplingConfig(bad_words_ids=[[1, 2], [np.int64(3)]], logit_bias=[[5, 1]],
                            stop_token_ids=[9])
    tupled = SamplingConfig(bad_words_ids=((1, 2), (3,)), logit_bias=((5, 1.0),),
                            stop_token_ids=(9,))
    assert listed == tupled and hash(listed) == hash(tupled)
    assert type(listed.bad_words_ids[1][0]) is int and type(listed.logit_bias[0][1]) is float


def test_greedy_token_is_argmax_with_its_ties_and_nans():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 50.0  # a tie: the first index wins, as in argmax
    logits[2, :] = -np.inf  # every token banned
    logits[3, 17] = np.nan  # a NaN counts as the maximum, as in argmax
    logits[4, :] = 0.0
    logits[5, -1] = 99.0
    got = np.asarray(jax.jit(greedy_token)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    assert got.dtype == np.int32
