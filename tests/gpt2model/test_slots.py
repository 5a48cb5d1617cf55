"""Slot refill (`Generator.run_stream`) and stop strings found on the device (`gpt2model.stops`).

The reference for a stream is `run_batch` on each sample alone: same tokens, text and finish
reason, log-probs within 1e-5, for greedy and seeded sampling, with eos at varied steps (a
model whose eos embedding points along its mean hidden state) and with stop strings. The
reference for the device stop check is the host's decoding of every prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpt2_vocab_dir

from gpt2model import (
    Generator,
    Sample,
    SamplingConfig,
    from_pretrained,
    get_tokenizer,
    slots,
    stops,
)
from gpt2model.generation import finish
from gpt2model.model import GPT2Model
from gpt2model.tokenizer import from_vocab_files

EOS = 50256
PROMPTS = ["The Manhattan bridge", "Hello", "In 1905, Albert Einstein published four papers",
           "def f(x):", "A quick brown fox", "Once upon a time there", "x = 1", "Paris is",
           "1, 2, 3,", "She said"]
OTHER = ["The weather today is", "Numbers: 4, 5, 6", "import numpy as np", "Dear Sir,",
         "Red, green and blue", "Tomorrow we will"]
P, N = 12, 24  # prompt length bucket, max_new_tokens
GREEDY = SamplingConfig(max_new_tokens=N)
SAMPLED = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.9)
# Length of eos's embedding along the mean final hidden state of the prompts: eos then wins at
# a few steps of a few rows (checked in the tests that rely on it).
EOS_ALPHA = 2.7


@pytest.fixture(scope="module")
def ckpt(lively_checkpoint):
    return lively_checkpoint


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return get_tokenizer(ckpt)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[tuple[int, ...]]:
    return [tuple(tokenizer.encode(p)) for p in PROMPTS]


@pytest.fixture(scope="module")
def gen(ckpt, tokenizer) -> Generator:
    return Generator(*from_pretrained(ckpt), tokenizer)


@pytest.fixture(scope="module")
def eos_gen(ckpt, tokenizer, prompt_ids) -> Generator:
    """The same model with wte[EOS] = EOS_ALPHA x the unit mean final hidden state."""
    config, params = from_pretrained(ckpt)
    t = params["transformer"]
    hidden = jnp.concatenate([GPT2Model(config).apply({"params": t}, jnp.asarray([q]))[
        "last_hidden_state"][0] for q in prompt_ids])
    u = hidden.mean(0) / jnp.linalg.norm(hidden.mean(0))
    params = {**params, "transformer": {**t, "wte": {
        "embedding": t["wte"]["embedding"].at[EOS].set(EOS_ALPHA * u)}}}
    return Generator(config, params, tokenizer)


def samples_of(prompts, num_samples: int = 1) -> list[Sample]:
    return [Sample(f"rec{i}", s, tuple(q)) for i, q in enumerate(prompts)
            for s in range(num_samples)]


def alone(gen: Generator, samples, settings, seed: int = 7) -> list:
    """The reference: run_batch on each sample by itself."""
    return [gen.run_batch([s], settings, seed=seed, length=P, rows=1)[0] for s in samples]


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=0, atol=1e-5)
        assert (g.top_token_ids is None) == (w.top_token_ids is None)
        if w.top_token_ids is not None:
            assert g.top_token_ids == w.top_token_ids
            np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- slot refill


def test_greedy_stream_equals_one_sample_at_a_time(eos_gen, prompt_ids):
    """Ten prompts through three slots, rows ending at eos at varied steps: each slot is
    refilled with the next prompt while the others keep decoding."""
    samples = samples_of(prompt_ids)
    want = alone(eos_gen, samples, GREEDY)
    eos_at = {len(w.token_ids) for w in want if w.finish_reason == "eos"}
    assert len(eos_at) >= 3 and any(w.finish_reason == "length" for w in want)
    got = eos_gen.run_stream(samples, GREEDY, seed=7, slots=3, prompt_length=P)
    assert_same(got, want)
    # A sample computes its tokens and its end token, no more.
    assert eos_gen.last_sample_steps == [
        len(w.token_ids) + (w.finish_reason == "eos") for w in want]


@pytest.mark.parametrize("n_slots, refill", [(4, 1), (5, 2)])
def test_seeded_sampling_stream_equals_one_sample_at_a_time(eos_gen, prompt_ids, n_slots,
                                                            refill):
    """Sampling with top_p, three samples a record: each draw is keyed by (seed, record,
    sample index) and the sample's own step, never the slot or the chunk."""
    samples = samples_of(prompt_ids, 3)
    want = alone(eos_gen, samples, SAMPLED)
    assert len({len(w.token_ids) for w in want if w.finish_reason == "eos"}) >= 3
    assert len({tuple(w.token_ids) for w in want}) > len(prompt_ids)  # samples differ
    got = eos_gen.run_stream(samples, SAMPLED, seed=7, slots=n_slots, prompt_length=P,
                             refill=refill)
    assert_same(got, want)


def test_seeded_sampling_stream_with_stop_strings(eos_gen, prompt_ids):
    """Stop strings end sampled rows early on the device; the slots freed take the next
    samples, and every result is still the one the sample gets alone."""
    samples = samples_of(prompt_ids, 3)
    settings = dataclasses.replace(SAMPLED, stop=(" a", ","))  # in about a third of the rows
    want = alone(eos_gen, samples, settings)
    assert len({len(w.token_ids) for w in want if w.finish_reason == "stop"}) >= 4
    got = eos_gen.run_stream(samples, settings, seed=7, slots=4, prompt_length=P)
    assert_same(got, want)
    for w, steps in zip(want, eos_gen.last_sample_steps, strict=True):
        if w.finish_reason == "stop":
            assert steps == len(w.token_ids) < N


CONTROLS = {
    "repetition_penalty": dict(repetition_penalty=1.3),
    "penalties": dict(presence_penalty=0.8, frequency_penalty=0.5),
    "ngram_bad_words_bias": dict(no_repeat_ngram_size=2, bad_words_ids=((11, 13), (198,)),
                                 logit_bias=((464, 2.0),)),
    "min_new_stop_token_top_logprobs": dict(min_new_tokens=6, stop_token_ids=(13,),
                                            top_logprobs=3),
    "sampled_repetition_top_k": dict(temperature=0.8, top_k=20, repetition_penalty=1.2),
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_per_row_controls_keep_their_own_history(eos_gen, prompt_ids, name):
    """Each control reads its own row's history at its own step through the refill path."""
    settings = dataclasses.replace(GREEDY, max_new_tokens=16, **CONTROLS[name])
    samples = samples_of(prompt_ids[:7])
    want = alone(eos_gen, samples, settings)
    got = eos_gen.run_stream(samples, settings, seed=7, slots=3, prompt_length=P)
    assert_same(got, want)


def test_compiles_bounded_by_shapes(eos_gen, prompt_ids, tokenizer):
    """One chunk loop per (slots, prompt length, settings), one admit per insert width and
    packed prefill shape: a second stream of other prompts compiles nothing."""
    gen = Generator(eos_gen.config, eos_gen.params, tokenizer)
    settings = dataclasses.replace(GREEDY, repetition_penalty=1.1)
    first = samples_of(prompt_ids)
    other = samples_of([tokenizer.encode(p) for p in OTHER])
    # The first fill's packed prefill takes one of up to PREFILL_STEPS shapes: these two
    # streams' first fills pack alike (two rows of P), so nothing at all may compile.
    assert {slots._plan([s.prompt_ids for s in stream[:4]], P, 4, EOS, 1)[0].ids.shape
            for stream in (first, other)} == {(2, P)}
    def programs() -> tuple[int, int]:
        fns = {name: fn._cache_size() for (name, _), fn in gen._stream_fns.items()}
        return fns["admit"], fns["chunk"]

    gen.run_stream(first, settings, seed=1, slots=4, prompt_length=P)
    # Admits of the first fill and of one row; the chunk loop at 4 slots, and at 2 and 1 as
    # the tail shrinks the state (one compile per halving).
    admits, chunks = programs()
    assert (admits, gen.compile_count) == (2, admits + chunks) and 1 <= chunks <= 3
    gen.run_stream(other, settings, seed=2, slots=4, prompt_length=P)
    gen.run_stream(other, dataclasses.replace(settings, stop=("xyz", "the")), seed=3,
                   slots=4, prompt_length=P)  # stop strings select no program
    assert programs()[0] == 2 and programs()[1] <= 3
    before = gen.compile_count
    gen.run_stream(first, settings, seed=1, slots=4, prompt_length=P)
    assert gen.compile_count == before


def test_live_fraction_beats_fixed_batches(eos_gen, prompt_ids):
    """On a workload of varied lengths, refilled slots compute live rows more often than
    fixed batches of the same row count, which wait for their longest row."""
    samples = samples_of(prompt_ids)
    live = total = 0
    for at in range(0, len(samples), 4):
        chunk = samples[at:at + 4]
        eos_gen.run_batch(chunk, GREEDY, seed=7, length=P, rows=4)
        live += sum(eos_gen.last_sample_steps)
        total += 4 * eos_gen.last_decode_steps
    eos_gen.run_stream(samples, GREEDY, seed=7, slots=4, prompt_length=P)
    stream = eos_gen.last_live_fraction
    print(f"live fraction: fixed batches {live / total:.3f}, refilled slots {stream:.3f}")
    assert sum(eos_gen.last_sample_steps) == live  # the same tokens computed either way
    # Slot-steps: 4 rows per decode step until the tail halves the state.
    assert eos_gen.last_slot_steps < 4 * eos_gen.last_decode_steps
    assert stream == pytest.approx(live / eos_gen.last_slot_steps)
    assert 0 < live / total < stream <= 1


def test_stream_refuses_echo_and_bad_sizes(gen, prompt_ids):
    with pytest.raises(ValueError, match="echo"):
        gen.run_stream(samples_of(prompt_ids[:1]), dataclasses.replace(GREEDY, echo=True),
                       seed=0, slots=2, prompt_length=P)
    with pytest.raises(ValueError, match="does not fit"):
        gen.run_stream(samples_of(prompt_ids[2:3]), GREEDY, seed=0, slots=2, prompt_length=4)
    assert gen.run_stream([], GREEDY, seed=0, slots=2, prompt_length=P) == []


# ------------------------------------------------------------------ stop strings on device


def test_stop_strings_end_rows_on_device(gen, prompt_ids, tokenizer):
    """A stop string ends its row at the token completing it (fewer decode steps than
    max_new_tokens), in both decode paths, with exactly the host cut of the full row."""
    samples = samples_of(prompt_ids[:6])
    full = alone(gen, samples, GREEDY)
    assert all(f.finish_reason == "length" for f in full)
    stop = tokenizer.decode(full[0].token_ids[5:7]).strip()
    assert len(stop) >= 2 and stop not in tokenizer.decode(full[0].token_ids[:5])
    settings = dataclasses.replace(GREEDY, stop=(stop, "never appears \x00"))
    # Today's host cut of each full row: the answer whatever the device did.
    cut = [finish(f.token_ids, f.logprobs, tokenizer, EOS, settings.stop) for f in full]
    assert cut[0].finish_reason == "stop" and len(cut[0].token_ids) < N
    batch = gen.run_batch(samples, settings, seed=7, length=P, rows=len(samples))
    assert_same(batch, cut)
    stream = gen.run_stream(samples, settings, seed=7, slots=2, prompt_length=P)
    assert_same(stream, cut)
    for g, steps in zip(cut, gen.last_sample_steps, strict=True):
        assert steps == (len(g.token_ids) if g.finish_reason == "stop" else N)
    assert gen.last_sample_steps[0] < N
    one = gen.run_batch(samples[:1], settings, seed=7, length=P, rows=1)
    assert_same(one, cut[:1])
    assert gen.last_decode_steps == len(cut[0].token_ids) < N  # the loop ended there


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    d = gpt2_vocab_dir()
    return from_vocab_files(d / "encoder.json", d / "vocab.bpe")


def test_token_bytes_decode_like_the_tokenizer(gpt2_tokenizer):
    table, counts = stops.token_bytes(gpt2_tokenizer, 50304)  # a padded model vocabulary
    assert table.shape[0] == 50304 and counts[50257:].max() == 0
    for i in (0, 198, 220, 11, 50256, 30325):
        piece = bytes(table[i, :counts[i]].astype(np.uint8))
        assert piece.decode("utf-8", "replace") == gpt2_tokenizer.decode([i])


def test_device_stops_rules():
    assert stops.device_stops(["ab", "", "ab", "xabz", "cd"]) == [b"xabz", b"cd"]
    assert stops.device_stops(["ok", "bad\ufffd"]) == []
    pattern = stops.patterns(["é", "The end"])
    assert pattern.shape == (stops.MIN_STRINGS, stops.MIN_BYTES)
    assert stops.patterns(["x" * 40]).shape == (stops.MIN_STRINGS, 64)


TEXT = ("Hello world, the quick brown fox jumps. Ünïcödé ✓ done\n\nEnd of story. 日本語のテキスト"
        " over-the-top ---- $$$ 🙂🙂 a.b.c")
STOP_SETS = [["fox"], ["\n\n"], ["✓"], ["本語"], ["quick brown", "brown"], ["nothing"], ["o"],
             ["🙂"], ["c", "b.c"], ["ö", "End"], [" over-the-top ----"]]


def test_device_check_finds_the_first_prefix_the_host_finds(gpt2_tokenizer):
    """`stops.advance` token by token stops at the first k whose decoded prefix holds a
    device stop string, on text with multi-byte characters split across tokens."""
    tok = gpt2_tokenizer
    table, counts = (jnp.asarray(a) for a in stops.token_bytes(tok, 50257))
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # characters split across tokens

    @jax.jit
    def first_hits(pattern, tokens):  # [R, T] -> the step of each row's first hit (T: none)
        def step(window, token):
            window, hit = stops.advance(window, token, table, counts, pattern)
            return window, hit
        _, hits = jax.lax.scan(step, jnp.asarray(stops.empty_window(tokens.shape[0], pattern)),
                               tokens.T)
        return jnp.where(hits.any(0), jnp.argmax(hits, 0), tokens.shape[1])

    rng = np.random.default_rng(0)
    rows = np.stack([ids] + [rng.permutation(ids) for _ in range(3)]).astype(np.int32)
    for stop in STOP_SETS:
        got = np.asarray(first_hits(stops.patterns(stop), rows))
        wanted = [s.decode() for s in stops.device_stops(stop)]
        for r, row in enumerate(rows.tolist()):
            host = next((k for k in range(len(row))
                         if any(s in tok.decode(row[:k + 1]) for s in wanted)), len(row))
            assert got[r] == host, (stop, r)
