"""Generation: greedy decoding against transformers' `generate`, samplers, stopping, compiles.

Greedy references come from transformers' `generate(do_sample=False)` on the same checkpoint and
the same left-padded batch; top-p filtering is checked against a sort-based reference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, cli_env, torch_left_pad, write_hf_checkpoint

import gpt2model
from gpt2model import Generator, SamplingConfig, from_pretrained, get_tokenizer
from gpt2model.batching import left_pad
from gpt2model.generation import filter_logits

EOS = 50256
PROMPTS = ["The Manhattan bridge", "Hello", "In 1905, Albert Einstein published four papers",
           "def f(x):"]
GREEDY = SamplingConfig(max_new_tokens=32)
SAMPLE = SamplingConfig(max_new_tokens=32, temperature=1.0)
# Every call pads to this batch and prompt length unless a test varies them on purpose: each new
# (batch, prompt length, settings) is a compile, and compiles are most of this file's run time.
FIXED = dict(batch_size=4, prompt_length=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny GPT-2 with larger random weights (std 0.4): greedy paths that keep changing token."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=0,
                               **dict(TINY, initializer_range=0.4))


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return get_tokenizer(ckpt)


@pytest.fixture(scope="module")
def gen(ckpt, tokenizer) -> Generator:
    return Generator(*from_pretrained(ckpt), tokenizer)


@pytest.fixture(scope="module")
def ref(ckpt) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy(gen, prompt_ids):
    return [g[0] for g in gen.generate(prompt_ids, settings=GREEDY, **FIXED)]


def hf_generate(ref, prompts: list[list[int]], max_new_tokens: int, eos: int = EOS):
    """transformers' greedy generate on the left-padded batch: (new tokens, step log-probs)."""
    ids, mask = torch_left_pad(prompts, EOS)
    length = ids.shape[1]
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=EOS, eos_token_id=eos,
                           output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).double()  # [B, N, V]
    return out.sequences[:, length:].numpy(), torch.log_softmax(logits, -1).numpy()


def cut_at(tokens, eos: int) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


# --------------------------------------------------------------------------------- greedy


def test_greedy_matches_transformers_generate(greedy, ref, prompt_ids):
    tokens, logprobs = hf_generate(ref, prompt_ids, 32)
    for r, g in enumerate(greedy):
        want = cut_at(tokens[r], EOS)
        assert g.token_ids == want
        assert g.finish_reason == ("eos" if len(want) < 32 else "length")
        assert len(set(want)) >= 10  # a varied sequence, not one token repeated
        steps = np.arange(len(want))
        np.testing.assert_allclose(g.logprobs, logprobs[r, steps, want], rtol=0, atol=1e-4)


def aim_eos_at(ref, prompt: list[int], path: list[int]) -> tuple[int, np.ndarray]:
    """A new <|endoftext|> embedding that makes greedy decoding stop at some step k of `path`.

    With tied weights the eos logit is h . wte[eos] (h: the final hidden state). Pointing
    wte[eos] along h_k, long enough to beat the best logit there but not at the steps before,
    makes eos the argmax first at step k. Returns (k, the float32 embedding).
    """
    seq = torch.tensor([prompt + path])
    with torch.no_grad():
        h = ref.transformer(seq).last_hidden_state[0, len(prompt) - 1:].double()  # [N+1, E]
        logits = h @ ref.transformer.wte.weight.double().T
    logits[:, EOS] = -np.inf
    best = logits.max(-1).values.numpy()
    h = h.numpy()
    for k in range(8, len(path) - 4):
        u = h[k] / np.linalg.norm(h[k])
        alpha = 1.1 * best[k] / np.linalg.norm(h[k])
        if best[k] > 0 and np.all(alpha * (h[:k] @ u) < best[:k] - 0.1):
            return k, (alpha * u).astype(np.float32)
    raise AssertionError("no step of the greedy path can be made an eos step")


def test_eos_stops_a_row_matches_transformers_and_compiles_once(
        ckpt, tokenizer, greedy, ref, prompt_ids):
    """A model that emits <|endoftext|> mid-way through row 0: that row stops there, the others
    run on, all as transformers' generate does. Its fresh Generator also counts compiles: two
    calls with the same batch, prompt length and settings compile once."""
    k, eos_vector = aim_eos_at(ref, prompt_ids[0], greedy[0].token_ids)
    eos_ref = copy.deepcopy(ref)
    with torch.no_grad():
        eos_ref.transformer.wte.weight[EOS] = torch.from_numpy(eos_vector)  # the head is tied
    config, params = from_pretrained(ckpt)
    t = params["transformer"]
    params = {**params, "transformer": {**t, "wte": {
        "embedding": t["wte"]["embedding"].at[EOS].set(eos_vector)}}}
    gen = Generator(config, params, tokenizer)

    out = gen.generate(prompt_ids, settings=GREEDY, **FIXED)
    tokens, logprobs = hf_generate(eos_ref, prompt_ids, 32)
    assert EOS in tokens[0].tolist() and int(np.argmax(tokens[0] == EOS)) == k
    first = out[0][0]
    assert first.token_ids == greedy[0].token_ids[:k] and first.finish_reason == "eos"
    assert first.text == tokenizer.decode(first.token_ids)
    for r, g in enumerate(out):
        want = cut_at(tokens[r], EOS)
        assert g[0].token_ids == want
        assert g[0].finish_reason == ("eos" if len(want) < 32 else "length")
        np.testing.assert_allclose(g[0].logprobs, logprobs[r, np.arange(len(want)), want],
                                   rtol=0, atol=1e-4)
    again = gen.generate(prompt_ids[::-1], settings=GREEDY, **FIXED)
    assert [g[0] for g in again] == [g[0] for g in out[::-1]]
    assert gen.compile_count == 2  # one packed prefill shape and one decode loop


def test_length_finish_reason(greedy):
    for g in greedy:
        assert g.finish_reason == "length" and len(g.token_ids) == GREEDY.max_new_tokens


def test_no_recompile_for_other_prompts_of_the_same_shape(gen, greedy, prompt_ids):
    count = gen.compile_count
    again = gen.generate(prompt_ids[::-1], settings=GREEDY, **FIXED)
    assert gen.compile_count == count
    assert [g[0] for g in again] == greedy[::-1]


# ------------------------------------------------------------------------------- stopping


def test_stop_string_cuts_text_and_sets_reason(gen, greedy, tokenizer, prompt_ids):
    full = greedy[2]
    # A stop string that really occurs mid-way: the text of generated tokens 8..9.
    stop = tokenizer.decode(full.token_ids[8:10]).strip()
    pos = full.text.find(stop)
    assert len(stop) >= 3 and 0 < pos < len(full.text) - len(stop)
    out = gen.generate(prompt_ids, settings=GREEDY, stop=[stop, "never appears \x00"],
                       **FIXED)[2][0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:pos]
    keep = len(out.token_ids)
    assert out.token_ids == full.token_ids[:keep] and out.logprobs == full.logprobs[:keep]
    assert stop in tokenizer.decode(out.token_ids)  # ends with the token completing the stop
    assert stop not in tokenizer.decode(out.token_ids[:-1])
    # The earliest of several stop strings wins; one that never occurs changes nothing.
    early = full.text[1:4]
    out2 = gen.generate(prompt_ids, settings=GREEDY, stop=[stop, early], **FIXED)[2][0]
    assert out2.text == full.text[:full.text.find(early)] and out2.finish_reason == "stop"
    other = gen.generate(prompt_ids, settings=GREEDY, stop=["never appears \x00"], **FIXED)[2][0]
    assert other == full


# ------------------------------------------------------------------------------- sampling


def sample_ids(gen, prompts, keys, seed=7, **kwargs):
    kwargs = {**FIXED, **kwargs}
    return {k: g[0].token_ids for k, g in zip(keys, gen.generate(
        prompts, settings=SAMPLE, seed=seed, keys=keys, **kwargs), strict=True)}


def test_sampling_is_reproducible_per_record(gen, prompt_ids, greedy):
    p = prompt_ids
    together = sample_ids(gen, p, ["a", "b", "c", "d"])
    assert len({tuple(v) for v in together.values()}) == 4
    # Batch of one, no other prompt, no padding: another shape, another compile, same sample.
    alone = sample_ids(gen, [p[1]], ["b"], batch_size=None, prompt_length=None)
    # Other positions and other neighbours (the same prompt twice under other keys).
    moved = sample_ids(gen, [p[3], p[0], p[1], p[0]], ["d", "x", "b", "y"])
    assert alone["b"] == together["b"] == moved["b"]
    assert moved["d"] == together["d"]
    assert moved["x"] != moved["y"]  # the key, not the prompt, picks the stream
    # Each token a sample, not the argmax: the sampled sequences are not the greedy ones.
    assert all(together[k] != g.token_ids for k, g in zip("abcd", greedy, strict=True))


def test_different_seeds_or_keys_differ(gen, prompt_ids):
    p = prompt_ids
    base = sample_ids(gen, p, ["a", "b", "c", "d"])
    other_seed = sample_ids(gen, p, ["a", "b", "c", "d"], seed=8)
    assert all(base[k] != other_seed[k] for k in base)
    other_keys = sample_ids(gen, p, ["e", "f", "g", "h"])
    assert all(a != b for a, b in zip(base.values(), other_keys.values(), strict=True))


def test_samples_of_one_prompt_differ_and_the_first_is_the_single_sample(gen, prompt_ids):
    out = gen.generate(prompt_ids[:2], settings=SAMPLE, seed=7, keys=["a", "b"], num_samples=2,
                       **FIXED)
    assert [len(x) for x in out] == [2, 2]
    assert out[0][0].token_ids != out[0][1].token_ids
    single = sample_ids(gen, prompt_ids, ["a", "b", "c", "d"])
    assert out[0][0].token_ids == single["a"] and out[1][0].token_ids == single["b"]


@pytest.mark.parametrize("settings", [
    SamplingConfig(max_new_tokens=32, temperature=1.0, top_k=1),
    SamplingConfig(max_new_tokens=32, temperature=0.7, top_p=1e-6),
], ids=["top_k=1", "top_p=1e-6"])
def test_filters_that_leave_one_token_equal_greedy(gen, prompt_ids, greedy, settings):
    out = gen.generate(prompt_ids, settings=settings, seed=3, **FIXED)
    assert [g[0].token_ids for g in out] == [g.token_ids for g in greedy]


# --------------------------------------------------------------------------- filter_logits


def reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """Keep-mask by sorting, as transformers' TopK then TopP warpers do (smallest nucleus)."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        keep &= x >= kth
    if top_p < 1.0:
        z = np.where(keep, x, -np.inf)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly above each token
        nucleus = np.zeros_like(keep)
        np.put_along_axis(nucleus, order, before < top_p, -1)
        keep &= nucleus
    return keep, x


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (1.0, 0, 0.9), (1.0, 0, 0.5), (0.7, 0, 0.1), (2.0, 0, 0.95), (1.0, 50, 0.8), (1.0, 7, 1.0),
    (0.5, 0, 0.999),
])
def test_filter_logits_equals_sorting_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((6, 5000)) * rng.uniform(0.5, 4.0, (6, 1))).astype(np.float32)
    settings = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(jax.jit(filter_logits, static_argnums=1)(jnp.asarray(logits), settings))
    keep, scaled = reference_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    assert keep.sum(-1).min() >= 1
    np.testing.assert_allclose(got[keep], scaled[keep], rtol=1e-6)


# ------------------------------------------------------------------------- packed prefill


def test_prefill_plan_packs_left_padded_prompts_without_losing_a_token():
    from gpt2model.batching import plan_prefill

    rng = np.random.default_rng(0)
    lengths = [32, 5, 20, 12, 1, 30, 7, 32]
    ids, mask = left_pad([rng.integers(0, 50000, n).tolist() for n in lengths], 32, 8, EOS)
    plan = plan_prefill(ids, mask, EOS, steps=4)
    # 139 tokens fit 5 rows of 32; steps of 2 rows (8 prompts / 4 steps) give 6.
    assert plan.ids.shape == (6, 32)
    assert plan_prefill(ids, mask, EOS, steps=8).ids.shape == (5, 32)
    for b, n in enumerate(lengths):
        r, c = plan.row[b], plan.start[b]
        assert plan.lengths[b] == n
        np.testing.assert_array_equal(plan.ids[r, c:c + n], ids[b, 32 - n:])
        assert np.all(plan.segments[r, c:c + n] == b + 1)
    assert np.count_nonzero(plan.segments) == sum(lengths)  # nothing else is real
    # The device count divides the packed rows; never more rows than the batch.
    assert plan_prefill(ids, mask, EOS, row_multiple=4).ids.shape[0] == 8
    full = left_pad([[1] * 32] * 8, 32, 8, EOS)
    assert plan_prefill(*full, EOS).ids.shape[0] == 8
    with pytest.raises(ValueError, match="left-padded"):
        plan_prefill(ids, np.ones_like(mask) - mask, EOS)


def test_pass_rows_splits_packed_rows_into_even_passes_within_the_budget():
    from gpt2model.batching import pass_rows

    assert pass_rows(48, 128, None) == 48  # no budget: one pass
    assert pass_rows(16, 128, 2048) == 16  # fits
    assert pass_rows(48, 128, 2048) == 16  # 3 passes of 16
    assert pass_rows(40, 128, 2048) == 14  # 3 passes (not 16 + 16 + 8), 2 rows of fill
    assert pass_rows(5, 1024, 2048) == 2  # 3 passes, one row of fill
    assert pass_rows(5, 1024, 512) == 1  # a row longer than the budget: a row a pass
    assert pass_rows(12, 128, 512, multiple=2) == 4  # 3 passes, each split over 2 devices
    assert pass_rows(6, 128, 128, multiple=4) == 4  # never below the device count


@pytest.mark.parametrize("budget", [None, 16, 32])
def test_packed_prefill_cache_equals_the_left_padded_forward(tiny_checkpoint, budget):
    """The cache and logits the packed prefill builds equal running the left-padded prompts
    through the cached forward pass (the path transformers parity is tested on), in one pass
    or in passes of `budget` tokens (3 passes of one row; 2 passes of 2 rows, one a fill)."""
    from gpt2model.batching import plan_prefill
    from gpt2model.generation import _prefill
    from gpt2model.model import GPT2LMHeadModel

    config, params = gpt2model.from_pretrained(tiny_checkpoint)
    rng = np.random.default_rng(1)
    lengths = [9, 3, 16, 1, 12, 5]
    ids, mask = left_pad([rng.integers(0, 50000, n).tolist() for n in lengths], 16, 6, EOS)
    model = GPT2LMHeadModel(config)
    plan = plan_prefill(ids, mask, EOS)
    assert plan.ids.shape == (3, 16)
    logits, cache = jax.jit(_prefill, static_argnums=(0, 1), static_argnames="token_budget")(
        model, 4, params, plan, token_budget=budget)
    ref = model.apply({"params": params}, ids, attention_mask=mask,
                      past_key_values=gpt2model.init_cache(config, 6, 20), use_cache=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref["logits"][:, -1]),
                               rtol=0, atol=1e-5)
    want = ref["past_key_values"]
    np.testing.assert_array_equal(np.asarray(cache.mask), np.asarray(want.mask))
    assert int(cache.index) == int(want.index) == 16
    np.testing.assert_array_equal(np.asarray(cache.position), lengths)
    real = np.asarray(want.mask)[:, None, :, None]  # pads' slots are never read
    for got, exp in zip(cache.keys + cache.values, want.keys + want.values, strict=True):
        np.testing.assert_allclose(np.where(real, np.asarray(got), 0),
                                   np.where(real, np.asarray(exp), 0), rtol=0, atol=1e-5)


_PASSES_ON_TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    assert jax.device_count() == 2, jax.devices()
    from gpt2model import Generator, SamplingConfig, from_pretrained, get_tokenizer
    from pipeline.handler import DataParallel
    dp = DataParallel()
    config, params = from_pretrained(sys.argv[1])
    for budget in (8, None):
        gen = Generator(config, dp.put_params(params), get_tokenizer(sys.argv[1]),
                        put_batch=dp.put_batch, row_multiple=2, prefill_tokens=budget)
        out = gen.generate(json.loads(sys.argv[2]), settings=SamplingConfig(max_new_tokens=32),
                           batch_size=8, prompt_length=8)
        print("TOKENS " + json.dumps([g[0].token_ids for g in out]))
""")


def test_prefill_in_passes_split_over_two_devices_gives_the_same_tokens(gen, ckpt, prompt_ids):
    """8 prompts packed into 4 prefill rows, run in passes of 8 tokens (2 passes of 2 rows, a
    row per device) and in one pass on 2 host devices: the greedy tokens of one device."""
    prompts = prompt_ids * 2
    want = [g[0].token_ids for g in gen.generate(prompts, settings=GREEDY, batch_size=8,
                                                  prompt_length=8)]
    proc = subprocess.run(
        [sys.executable, "-c", _PASSES_ON_TWO_DEVICES, str(ckpt), json.dumps(prompts)],
        env=cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(x.removeprefix("TOKENS ")) for x in proc.stdout.splitlines()
           if x.startswith("TOKENS ")]
    assert got == [want, want]


def test_prefill_tokens_must_be_positive(ckpt, tokenizer):
    for bad in (0, -5, 2.5, "big"):
        with pytest.raises(ValueError, match="prefill_tokens"):
            Generator(*from_pretrained(ckpt), tokenizer, prefill_tokens=bad)


# ----------------------------------------------------------------- logits controls (greedy)


class _VllmPenalties(transformers.LogitsProcessor):
    """presence/frequency penalties (vLLM's formula) for transformers, which has none: the
    tokens after the padded prompt count."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(
            1, input_ids[:, self.prompt_length:],
            torch.ones(input_ids[:, self.prompt_length:].shape, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_generate_with(ref, prompts: list[list[int]], settings: SamplingConfig):
    """transformers' greedy generate with the settings' controls: (new tokens [B, N], the
    model's log-probs [B, N, V] from the unprocessed logits)."""
    ids, mask = torch_left_pad(prompts, EOS)
    length = ids.shape[1]
    s = settings
    kwargs = dict(repetition_penalty=s.repetition_penalty,
                  no_repeat_ngram_size=s.no_repeat_ngram_size or None,
                  min_new_tokens=s.min_new_tokens or None,
                  bad_words_ids=[list(w) for w in s.bad_words_ids] or None,
                  sequence_bias=[[[t], b] for t, b in s.logit_bias] or None)
    if s.presence_penalty or s.frequency_penalty:
        kwargs["logits_processor"] = transformers.LogitsProcessorList(
            [_VllmPenalties(s.presence_penalty, s.frequency_penalty, length)])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=s.max_new_tokens, pad_token_id=EOS,
                           eos_token_id=[EOS, *s.stop_token_ids], output_logits=True,
                           return_dict_in_generate=True, **kwargs)
    logits = torch.stack(out.logits, 1).double()  # [B, N, V] raw: before the processors
    return out.sequences[:, length:].numpy(), torch.log_softmax(logits, -1).numpy()


def cut_with_reason(tokens, ends: set[int]) -> tuple[list[int], str]:
    """The output before the first end token, and the finish reason that implies."""
    tokens = [int(t) for t in tokens]
    n = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    if n == len(tokens):
        return tokens, "length"
    return tokens[:n], "eos" if tokens[n] == EOS else "stop_token"


STOP_TOKEN = 6862  # in the greedy outputs of rows 0, 1 and 3 (checked below)


def control_settings(name: str, base: list[list[int]], prompts: list[list[int]]):
    """Settings exercising one control, or all, aimed at tokens the plain greedy run chose."""
    controls = {
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram": dict(no_repeat_ngram_size=2),
        "presence_frequency": dict(presence_penalty=1.0, frequency_penalty=0.5),
        # One token; two tokens; three; a prefix that is the prompt's last token.
        "bad_words": dict(bad_words_ids=((base[0][2],), tuple(base[1][3:5]), tuple(base[2][5:8]),
                                         (prompts[3][-1], base[3][0]))),
        "logit_bias": dict(logit_bias=((base[0][1], -30.0), (base[2][0], -30.0), (13, 2.0))),
        "stop_tokens_min_new": dict(stop_token_ids=(STOP_TOKEN,), min_new_tokens=7),
    }
    if name == "all":
        return SamplingConfig(max_new_tokens=32, **{k: v for c in controls.values()
                                                    for k, v in c.items()})
    return SamplingConfig(max_new_tokens=32, **controls[name])


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram", "presence_frequency",
                                  "bad_words", "logit_bias", "stop_tokens_min_new", "all"])
def test_greedy_with_controls_matches_transformers_generate(name, gen, greedy, ref, prompt_ids):
    """Each control, and all of them at once, token for token as transformers' generate
    (presence/frequency through a processor of vLLM's formula, which transformers lacks)."""
    base = [g.token_ids for g in greedy]
    settings = control_settings(name, base, prompt_ids)
    out = [g[0] for g in gen.generate(prompt_ids, settings=settings, **FIXED)]
    want, logprobs = hf_generate_with(ref, prompt_ids, settings)
    ends = {EOS, *settings.stop_token_ids}
    for r, g in enumerate(out):
        assert (g.token_ids, g.finish_reason) == cut_with_reason(want[r], ends), r
        # The model's log-probs, not those of the processed logits.
        np.testing.assert_allclose(g.logprobs, logprobs[r, np.arange(len(g.token_ids)),
                                                         g.token_ids], rtol=0, atol=1e-4)
    assert sum(g.token_ids != b for g, b in zip(out, base, strict=True)) >= 2


def test_stop_token_ids_end_rows_with_their_finish_reason(gen, greedy, prompt_ids):
    settings = SamplingConfig(max_new_tokens=32, stop_token_ids=(STOP_TOKEN, 50000))
    out = [g[0] for g in gen.generate(prompt_ids, settings=settings, **FIXED)]
    stopped = 0
    for g, full in zip(out, greedy, strict=True):
        if STOP_TOKEN in full.token_ids:
            k = full.token_ids.index(STOP_TOKEN)
            assert g.finish_reason == "stop_token" and g.token_ids == full.token_ids[:k]
            assert g.logprobs == full.logprobs[:k]
            assert g.text == gen.tokenizer.decode(full.token_ids[:k])
            stopped += 1
        else:
            assert g == full
    assert stopped == 3
    # A stop string the text reaches before the stop token still wins, with its own reason.
    text = out[0].text
    stop = text[1:4]
    cut = gen.generate(prompt_ids, settings=settings, stop=[stop], **FIXED)[0][0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]


def test_min_new_tokens_holds_back_eos_as_transformers_does(ckpt, tokenizer, greedy, ref,
                                                            prompt_ids):
    """Row 0 of a model aimed to emit eos at step k: with min_new_tokens = k + 3 it goes on,
    as in transformers; and its eos is suppressed, not banned, after that."""
    k, eos_vector = aim_eos_at(ref, prompt_ids[0], greedy[0].token_ids)
    eos_ref = copy.deepcopy(ref)
    with torch.no_grad():
        eos_ref.transformer.wte.weight[EOS] = torch.from_numpy(eos_vector)
    config, params = from_pretrained(ckpt)
    t = params["transformer"]
    params = {**params, "transformer": {**t, "wte": {
        "embedding": t["wte"]["embedding"].at[EOS].set(eos_vector)}}}
    eos_gen = Generator(config, params, tokenizer)
    settings = SamplingConfig(max_new_tokens=32, min_new_tokens=k + 3)
    out = [g[0] for g in eos_gen.generate(prompt_ids, settings=settings, **FIXED)]
    want = hf_generate_with(eos_ref, prompt_ids, settings)
    for r, g in enumerate(out):
        assert (g.token_ids, g.finish_reason) == cut_with_reason(want[0][r], {EOS})
    assert len(out[0].token_ids) > k + 2 and out[0].token_ids[:k] == greedy[0].token_ids[:k]


def test_controls_compile_once_per_shape(gen, greedy, prompt_ids):
    settings = dataclasses.replace(control_settings("all", [g.token_ids for g in greedy],
                                                    prompt_ids), repetition_penalty=1.45)
    count = gen.compile_count
    first = gen.generate(prompt_ids, settings=settings, **FIXED)
    assert gen.compile_count == count + 1  # the decode loop for these settings, nothing else
    count = gen.compile_count
    listed = dataclasses.replace(settings, bad_words_ids=[list(w) for w in settings.bad_words_ids],
                                 logit_bias=[list(p) for p in settings.logit_bias])
    assert listed == settings
    again = gen.generate(prompt_ids[::-1], settings=listed, **FIXED)
    assert gen.compile_count == count
    assert [g[0] for g in again] == [g[0] for g in first[::-1]]
    # Controls left at their defaults are the plain program: no compile.
    gen.generate(prompt_ids, settings=SamplingConfig(max_new_tokens=32, repetition_penalty=1.0,
                                                     min_p=0.0), **FIXED)
    assert gen.compile_count == count


def test_processors_apply_before_the_sampling_warpers(gen, prompt_ids):
    """Sampling with min_p = 1 keeps only the processed logits' top token: the greedy result
    with the same penalties."""
    penalties = dict(max_new_tokens=32, repetition_penalty=1.5, presence_penalty=0.5)
    sampled = gen.generate(prompt_ids, settings=SamplingConfig(
        **penalties, temperature=0.8, min_p=1.0), seed=5, **FIXED)
    greedy = gen.generate(prompt_ids, settings=SamplingConfig(**penalties), **FIXED)
    assert [g[0].token_ids for g in sampled] == [g[0].token_ids for g in greedy]
