"""Beam search against transformers' `generate(num_beams=...)`: sequences, scores, compiles.

References are transformers' beam search on the same checkpoint and the same left-padded batch
(`output_scores=True, return_dict_in_generate=True` -> `sequences_scores`). Two models: the
tiny checkpoint as written, where eos never wins and every hypothesis runs to max_new_tokens,
and the same checkpoint with an eos embedding that makes eos likely, so hypotheses finish early,
the search stops before max_new_tokens and every early_stopping value gives other results.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from conftest import torch_left_pad

from gpt2model import from_pretrained, get_tokenizer
from gpt2model.beam_search import BeamSettings, Hypothesis, beam_search, compile_count

EOS = 50256
PROMPTS = ["The Manhattan bridge", "Hello", "In 1905, Albert Einstein published four papers",
           "def f(x):"]
OTHER_PROMPTS = ["A quick brown fox", "Once upon a time there", "x = 1"]
M = 12  # max_new_tokens everywhere but the compile test: one program per (N, es is True)
# Length of eos's new embedding along the mean final hidden state: eos becomes likely enough
# that hypotheses of every row finish early (checked by test_eos_model_finishes_early).
EOS_ALPHA = 3.0


@pytest.fixture(scope="module")
def ckpt(lively_checkpoint):
    return lively_checkpoint


@pytest.fixture(scope="module")
def prompt_ids(ckpt) -> list[list[int]]:
    tokenizer = get_tokenizer(ckpt)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain(ckpt):
    """(config, params, transformers model) as written."""
    config, params = from_pretrained(ckpt)
    return config, params, transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def eos_model(plain, prompt_ids):
    """The same model with wte[EOS] along the mean final hidden state of its beam outputs."""
    config, params, ref = plain
    seqs = [p + s for p, row in zip(prompt_ids, hf_beam_search(
        ref, prompt_ids, BeamSettings(num_beams=4, num_return_sequences=4, max_new_tokens=M)),
        strict=True) for s, _ in row]
    with torch.no_grad():
        h = torch.cat([ref.transformer(torch.tensor([s])).last_hidden_state[0] for s in seqs])
    u = h.mean(0) / h.mean(0).norm()
    vector = (EOS_ALPHA * u).numpy().astype(np.float32)
    eos_ref = copy.deepcopy(ref)
    with torch.no_grad():
        eos_ref.transformer.wte.weight[EOS] = torch.from_numpy(vector)  # the head is tied
    t = params["transformer"]
    params = {**params, "transformer": {**t, "wte": {
        "embedding": t["wte"]["embedding"].at[EOS].set(vector)}}}
    return config, params, eos_ref


def hf_beam_search(ref, prompts: list[list[int]], s: BeamSettings, eos: int = EOS,
                   return_length: bool = False):
    """transformers' beam search on the left-padded batch: [prompt][returned] (ids up to eos,
    sequence score), and with return_length the generated length of the output tensor."""
    ids, mask = torch_left_pad(prompts, eos)
    length = ids.shape[1]
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=mask, do_sample=False, num_beams=s.num_beams,
            num_return_sequences=s.num_return_sequences, length_penalty=s.length_penalty,
            early_stopping=s.early_stopping, max_new_tokens=s.max_new_tokens,
            output_scores=True, return_dict_in_generate=True, pad_token_id=eos,
            eos_token_id=eos)
    seqs, scores = out.sequences[:, length:].tolist(), out.sequences_scores.tolist()
    rr = s.num_return_sequences
    rows = [[(cut_at(seqs[r * rr + j], eos), scores[r * rr + j]) for j in range(rr)]
            for r in range(len(prompts))]
    return (rows, len(seqs[0])) if return_length else rows


def cut_at(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def assert_same(got: list[list[Hypothesis]], want) -> None:
    assert [[h.token_ids for h in row] for row in got] == [[t for t, _ in row] for row in want]
    np.testing.assert_allclose([[h.sequence_score for h in row] for row in got],
                               [[s for _, s in row] for row in want], rtol=0, atol=1e-4)


CASES = [
    # (num_beams, num_return_sequences, length_penalty, early_stopping)
    (4, 4, 1.0, True), (4, 4, 1.0, False), (4, 2, 2.0, False), (2, 2, 0.5, True),
    (2, 1, 2.0, True), (4, 1, 0.5, False), (4, 4, 2.0, "never"), (2, 2, 1.0, "never"),
]


def case_id(case) -> str:
    n, r, lp, es = case
    return f"N{n}-R{r}-lp{lp}-es{es}"


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=case_id)
def test_max_length_hypotheses_match_transformers(plain, prompt_ids, case):
    """Eos never wins: every hypothesis is max_new_tokens long, ranked by score alone."""
    config, params, ref = plain
    n, r, lp, es = case
    s = BeamSettings(num_beams=n, num_return_sequences=r, length_penalty=lp, early_stopping=es,
                     max_new_tokens=M)
    got = beam_search(config, params, prompt_ids, s, EOS)
    assert_same(got, hf_beam_search(ref, prompt_ids, s))
    assert all(len(h.token_ids) == M for row in got for h in row)
    assert all(len(row) == r for row in got) and len(got) == len(prompt_ids)
    for row in got:  # best first, and distinct hypotheses
        scores = [h.sequence_score for h in row]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.token_ids) for h in row}) == r


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_early_eos_hypotheses_match_transformers(eos_model, prompt_ids, case):
    config, params, ref = eos_model
    n, r, lp, es = case
    s = BeamSettings(num_beams=n, num_return_sequences=r, length_penalty=lp, early_stopping=es,
                     max_new_tokens=M)
    got = beam_search(config, params, prompt_ids, s, EOS)
    assert_same(got, hf_beam_search(ref, prompt_ids, s))


def test_eos_model_finishes_early(eos_model, prompt_ids):
    """The eos model exercises what the max-length cases cannot: hypotheses ending in eos of
    several lengths, the whole search stopping before max_new_tokens, and early_stopping
    True / False / "never" choosing differently."""
    _, _, ref = eos_model
    runs = {es: hf_beam_search(ref, prompt_ids, BeamSettings(
        num_beams=4, num_return_sequences=4, early_stopping=es, max_new_tokens=M),
        return_length=True) for es in (True, False, "never")}
    rows, length = runs[True]
    assert length < M  # every row done before max length
    assert len({len(t) for row in rows for t, _ in row}) >= 3
    assert runs[True][0] != runs[False][0] != runs["never"][0]


def test_padding_and_compile_count_bounded_by_shapes(eos_model, prompt_ids, ckpt):
    """Extra batch rows and a longer padded prompt change nothing; a second batch of other
    prompts with the same shapes, another length_penalty or num_return_sequences compile
    nothing; early_stopping True is another program."""
    config, params, ref = eos_model
    tokenizer = get_tokenizer(ckpt)
    other = [tokenizer.encode(p) for p in OTHER_PROMPTS]
    shape = dict(batch_size=5, prompt_length=13)  # used by no other test
    s = BeamSettings(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    before = compile_count()
    assert_same(beam_search(config, params, other, s, EOS, **shape),
                hf_beam_search(ref, other, s))
    assert compile_count() == before + 1
    s2 = BeamSettings(num_beams=3, num_return_sequences=3, length_penalty=2.0,
                      early_stopping="never", max_new_tokens=8)
    assert_same(beam_search(config, params, prompt_ids, s2, EOS, **shape),
                hf_beam_search(ref, prompt_ids, s2))
    assert compile_count() == before + 1
    s3 = BeamSettings(num_beams=3, early_stopping=True, max_new_tokens=8)
    assert_same(beam_search(config, params, other, s3, EOS, **shape),
                hf_beam_search(ref, other, s3))
    assert compile_count() == before + 2


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2.0), "num_beams must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(num_return_sequences=0), "num_return_sequences must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be <= "),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite number"),
    (dict(early_stopping="always"), "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BeamSettings(**kwargs)


def test_bad_calls_raise(plain):
    config, params, _ = plain
    s = BeamSettings(num_beams=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="each with at least one token"):
        beam_search(config, params, [[1, 2], []], s, EOS)
    with pytest.raises(ValueError, match="exceeds the model's context 64"):
        beam_search(config, params, [[1] * 61], s, EOS)
    with pytest.raises(ValueError, match="do not fit batch_size 1"):
        beam_search(config, params, [[1], [2]], s, EOS, batch_size=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        beam_search(config, params, [[1]], s, config.vocab_size)
    with pytest.raises(TypeError, match="BeamSettings"):
        beam_search(config, params, [[1]], {"num_beams": 2}, EOS)


def test_settings_are_hashable_program_keys():
    a = BeamSettings(num_beams=3, length_penalty=1, num_return_sequences=2)
    b = BeamSettings(num_beams=3, length_penalty=1.0, num_return_sequences=1)
    assert isinstance(a.length_penalty, float) and a != b
    assert hash(a) == hash(BeamSettings(num_beams=3, length_penalty=1.0, num_return_sequences=2))
    assert a.program == b.program == (3, 32, False)
    assert BeamSettings(early_stopping="never").program == BeamSettings().program
    assert BeamSettings(early_stopping=True).program != BeamSettings().program
    with pytest.raises(TypeError):
        BeamSettings(3)  # keyword-only
