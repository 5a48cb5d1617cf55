"""Scoring against transformers and lm-evaluation-harness's definitions.

Per-token log-probabilities are transformers' `log_softmax` gathered at the next token; rolling
windows are checked against the windows lm-evaluation-harness builds and against transformers
scoring each window itself (the Hugging Face perplexity guide's sliding window); continuation
scores follow lm-evaluation-harness's `loglikelihood` computed with transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, write_hf_checkpoint

from gpt2model import Scorer, from_pretrained, text_windows
from gpt2model.batching import RowPacker, pack_rows, pack_windows

EOS = 50256
WINDOW = TINY["n_positions"]  # 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny GPT-2 with larger random weights (std 0.4), so log-probs vary from token to token."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("lively"), seed=7,
                               **dict(TINY, initializer_range=0.4))


@pytest.fixture(scope="module")
def ref(ckpt) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def scorer(ckpt) -> Scorer:
    """Shared: most calls land in one (8, 64) bucket, so it compiles only a few times."""
    return Scorer(*from_pretrained(ckpt))


def hf_logprobs(ref, seq: list[int]) -> np.ndarray:
    """[len(seq), V] log-softmax of transformers' logits for one unpadded sequence."""
    assert len(seq) <= WINDOW
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([seq])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def hf_token_scores(ref, seq: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """log p(seq[j] | seq[:j]) and argmax == seq[j], for j = 1..len(seq)-1."""
    logp = hf_logprobs(ref, seq)[:-1]
    targets = np.array(seq[1:])
    return logp[np.arange(len(targets)), targets], logp.argmax(-1) == targets


def texts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, EOS, n).tolist() for n in lengths]


# ------------------------------------------------------------------------ per-token scores


def test_token_logprobs_match_transformers(scorer, ref):
    batch = texts(0, [12, 1, 40, 63, 7])
    scores = scorer.score_texts(batch)
    for ids, got in zip(batch, scores, strict=True):
        want, greedy = hf_token_scores(ref, [EOS, *ids])
        assert got.logprobs.dtype == np.float32 and got.num_scored == len(ids)
        assert np.max(np.abs(got.logprobs - want)) <= 1e-4
        np.testing.assert_array_equal(got.greedy, greedy)
        np.testing.assert_array_equal(got.token_ids, ids)
        assert got.sum_logprob == pytest.approx(float(want.sum()), abs=1e-3)


def test_without_bos_the_first_token_is_not_scored(scorer, ref):
    ids = texts(1, [60])[0]
    got = scorer.score_texts([ids], add_bos=False)[0]
    assert np.isnan(got.logprobs[0]) and not got.greedy[0]
    assert got.num_scored == len(ids) - 1
    want, _ = hf_token_scores(ref, ids)
    assert np.max(np.abs(got.logprobs[1:] - want)) <= 1e-4


def test_greedy_flags_on_a_greedy_text(scorer, ref):
    """A text the model itself would produce greedily is greedy at every token."""
    seq = [EOS, 464]
    for _ in range(10):
        seq.append(int(hf_logprobs(ref, seq)[-1].argmax()))
    got = scorer.score_texts([seq[1:], texts(2, [63])[0]])[0]
    assert got.greedy[1:].all() and got.is_greedy is bool(got.greedy[0])


def test_bfloat16_scores_are_float32_and_close(ckpt, scorer):
    batch = texts(2, [63, 9])
    bf16 = Scorer(*from_pretrained(ckpt), dtype=jnp.bfloat16).score_texts(batch)
    for a, b in zip(bf16, scorer.score_texts(batch), strict=True):
        assert a.logprobs.dtype == np.float32
        assert np.max(np.abs(a.logprobs - b.logprobs)) < 0.1 * np.max(np.abs(b.logprobs))


# ------------------------------------------------------------------------ batch independence


def test_scores_do_not_depend_on_the_batch(scorer):
    a, b, c = texts(3, [11, 63, 3])
    alone = scorer.score_texts([a], batch_size=1)[0].logprobs  # a [1, 16] batch
    variants = [
        scorer.score_texts([b, a, c])[1],  # other lengths, padded to 64, empty rows
        scorer.score_texts([c, c, b, a], batch_size=2)[3],  # another batch, another position
    ]
    for v in variants:
        np.testing.assert_allclose(v.logprobs, alone, rtol=0, atol=1e-5)
    # Called directly: the window after a full-length one, right-padded to the whole context.
    windows = text_windows(b, window=WINDOW, bos_token_id=EOS) + text_windows(
        a, window=WINDOW, bos_token_id=EOS)
    lp, _ = scorer(*pack_windows(windows, WINDOW, 8))
    np.testing.assert_allclose(np.asarray(lp)[1, :len(a)], alone, rtol=0, atol=1e-5)


def test_compiles_once_per_shape(scorer):
    before = scorer.compile_count
    scorer.score_texts(texts(5, [10, 12]), batch_size=1)  # bucket [1, 16]
    first = scorer.compile_count
    scorer.score_texts(texts(6, [14, 9, 15]), batch_size=1)  # the same bucket, three calls
    assert first - before <= 1 and scorer.compile_count == first


# ------------------------------------------------------------------------ rolling windows


def lm_eval_rolling_windows(tokens: list[int], prefix: int, max_len: int):
    """lm-evaluation-harness's `get_rolling_token_windows` with context_len=1, as (input, pred).

    Input is the full model input of each window (its context plus all but the last predicted
    token), which is what `make_disjoint_window` splits into context and continuation.
    """
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix, *tokens[:first - 1]], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        yield tokens[end - max_len - 1:end - 1], tokens[end - n:end]
        done += n


COMBOS = [(0, 4, 4), (1, 4, 4), (4, 4, 4), (5, 4, 4), (10, 4, 2), (10, 4, 1), (17, 8, 3),
          (17, 8, 8), (63, 64, 16), (64, 64, 16), (65, 64, 16), (200, 64, 64), (200, 64, 17),
          (129, 64, 63)]


@pytest.mark.parametrize("bos", [EOS, None])
@pytest.mark.parametrize(("n", "window", "stride"), COMBOS)
def test_windows_score_every_token_once(n, window, stride, bos):
    ids = list(range(1000, 1000 + n))
    seq = ([bos] if bos is not None else []) + ids
    plan = text_windows(ids, window=window, stride=stride, bos_token_id=bos)
    scored = []
    for w in plan:
        assert 0 < len(w.input_ids) <= window
        a = seq.index(w.input_ids[0])
        assert list(w.input_ids) == seq[a:a + len(w.input_ids)]  # a contiguous slice
        assert list(w.targets) == seq[a + 1:a + 1 + len(w.input_ids)]  # each predicts the next
        assert 0 <= w.score_start < w.score_end <= len(w.input_ids)
        first = a + 1 + w.score_start  # seq index of the first scored target
        assert w.target_offset == first - 1  # index into the target list seq[1:]
        scored += list(range(first, a + 1 + w.score_end))
        if w is not plan[0]:
            assert w.num_scored <= stride
            assert len(w.input_ids) == min(window, first + w.num_scored - 1)  # all context fits
    assert scored == list(range(1, len(seq)))  # every target once, in order


@pytest.mark.parametrize(("n", "window"), [(1, 4), (4, 4), (5, 4), (17, 8), (200, 64), (129, 64)])
def test_disjoint_windows_are_lm_eval_rolling_windows(n, window):
    ids = list(range(1000, 1000 + n))
    plan = text_windows(ids, window=window, stride=window, bos_token_id=EOS)
    ours = [(list(w.input_ids), list(w.targets[w.score_start:w.score_end])) for w in plan]
    assert ours == list(lm_eval_rolling_windows(ids, EOS, window))


def test_window_past_the_context_is_refused_and_empty_texts_score_empty(scorer):
    with pytest.raises(ValueError, match="window must be in 1..n_positions=64"):
        scorer.score_texts([[1, 2, 3]], window=WINDOW + 1)
    with pytest.raises(ValueError, match="window must be in 1..n_positions=64"):
        scorer.score_continuations([([1], [2])], window=2 * WINDOW)
    (empty,) = scorer.score_texts([[]])
    assert empty.num_scored == 0 and empty.logprobs.shape == (0,)


def test_text_in_one_window_equals_direct_score(scorer, ref):
    ids = texts(8, [60])[0]
    direct = scorer.score_texts([ids])[0].logprobs
    for window, stride in [(WINDOW, 16), (WINDOW, 1)]:
        windowed = scorer.score_texts([ids], window=window, stride=stride)[0].logprobs
        np.testing.assert_allclose(windowed, direct, rtol=0, atol=1e-5)
    want, _ = hf_token_scores(ref, [EOS, *ids])
    assert np.max(np.abs(direct - want)) <= 1e-4


def expected_sliding(ref, seq: list[int], window: int, stride: int) -> np.ndarray:
    """Score seq[1:] the perplexity-guide way: each window re-read by transformers.

    The first window scores targets 1..window; after it, targets come in chunks of `stride`,
    each scored in a window that ends with the chunk's last input token and holds `window`
    tokens (as many as precede it), so every target sees at least window - stride of context.
    """
    n = len(seq)
    out = np.full(n, np.nan)
    bounds = [(1, min(window + 1, n))]
    while bounds[-1][1] < n:
        start = bounds[-1][1]
        bounds.append((start, min(start + stride, n)))
    for t0, t1 in bounds:
        a = max(0, t1 - 1 - window)
        logp = hf_logprobs(ref, seq[a:t1 - 1])
        for k in range(t0, t1):
            out[k] = logp[k - 1 - a, seq[k]]
    return out[1:]


@pytest.mark.parametrize("stride", [16, WINDOW])
def test_long_text_windows_match_transformers_per_window(scorer, ref, stride):
    ids = texts(9, [150])[0]
    got = scorer.score_texts([ids], stride=stride)[0]
    assert got.num_scored == 150
    want = expected_sliding(ref, [EOS, *ids], WINDOW, stride)
    assert np.max(np.abs(got.logprobs - want)) <= 1e-4
    if stride < WINDOW:  # more context than disjoint windows: different numbers past window 1
        disjoint = scorer.score_texts([ids], stride=WINDOW)[0].logprobs
        assert np.max(np.abs(got.logprobs[WINDOW:] - disjoint[WINDOW:])) > 1e-3


# ---------------------------------------------------------------------- continuation scoring


def lm_eval_loglikelihood(ref, context: list[int], continuation: list[int], max_len: int):
    """lm-evaluation-harness's HFLM loglikelihood: (sum log p(continuation), is_greedy)."""
    context = context or [EOS]
    inp = (context + continuation)[-(max_len + 1):][:-1]
    logp = hf_logprobs(ref, inp)[-len(continuation):]
    cont = np.array(continuation)
    return float(logp[np.arange(len(cont)), cont].sum()), bool(
        (logp.argmax(-1) == cont).all())


def test_continuations_match_lm_eval_harness(scorer, ref):
    ctx, cont, long_ctx, short = texts(10, [10, 5, 80, 1])
    greedy_cont = []
    for _ in range(4):
        greedy_cont.append(int(hf_logprobs(ref, ctx + greedy_cont)[-1].argmax()))
    pairs = [(ctx, cont), ([], cont), (long_ctx, cont), (ctx, greedy_cont), (short, short),
             (ctx, texts(11, [60])[0])]
    got = scorer.score_continuations(pairs)
    for (c, x), (total, is_greedy) in zip(pairs, got, strict=True):
        want_total, want_greedy = lm_eval_loglikelihood(ref, c, x, WINDOW)
        assert total == pytest.approx(want_total, abs=1e-4 * len(x))
        assert is_greedy is want_greedy
    assert got[3][1] is True and got[0][1] is False


# --------------------------------------------------------------------------- packing


def test_row_packer_places_every_item_once_within_bounds():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 65, 500).tolist()
    packer = RowPacker(length=64, rows=4)
    batches = []
    for i, n in enumerate(sizes):
        batches += packer.add((i, n), n)
    batches += packer.flush()
    placed = [item for batch in batches for row in batch for item in row]
    assert sorted(i for i, _ in placed) == list(range(len(sizes)))
    assert all(len(batch) <= 4 for batch in batches)
    assert all(sum(n for _, n in row) <= 64 for batch in batches for row in batch)
    used = sum(sizes)
    capacity = 64 * sum(len(b) for b in batches)
    assert used / capacity > 0.9  # best-fit over a pool packs rows nearly full
    with pytest.raises(ValueError, match="does not fit"):
        packer.add("x", 65)


def test_row_packer_keeps_a_pool_of_rows_even_for_one_row_batches():
    """Small batches (a CPU's 1-2 rows) still pack best-fit over MIN_OPEN_ROWS open rows: eight
    6-token items then eight 4-token ones fill eight rows of 10 exactly, where a pool of
    2 x rows would have sent most 6-token rows out alone."""
    from gpt2model.batching import MIN_OPEN_ROWS

    assert MIN_OPEN_ROWS == 8
    packer = RowPacker(length=10, rows=1)
    batches = []
    for i, n in enumerate([6] * 8 + [4] * 8):
        batches += packer.add((i, n), n)
    batches += packer.flush()
    assert all(len(batch) == 1 for batch in batches)
    assert sorted(sum(n for _, n in batch[0]) for batch in batches) == [10] * 8
    assert len(packer.open) == 0


def test_packed_rows_score_like_one_text_per_row(scorer):
    """Texts sharing a row (segment ids) get the scores they get alone, within 1e-5."""
    rng = np.random.default_rng(9)
    windows = [text_windows(rng.integers(0, 50256, n).tolist(), window=64, bos_token_id=50256)[0]
               for n in (5, 17, 30, 9, 40, 1)]
    alone = scorer.score_windows(windows, 64, 8)
    rows = [[windows[0], windows[1], windows[3]], [windows[2], windows[5]], [windows[4]]]
    ids, tgt, seg, offsets = pack_rows(rows, 64, 4)
    lp, gr = jax.device_get(scorer(ids, tgt, seg))
    order = [0, 1, 3, 2, 5, 4]
    k = 0
    for r, row in enumerate(rows):
        for w, at in zip(row, offsets[r], strict=True):
            ref_lp, ref_gr = alone[order[k]]
            np.testing.assert_allclose(lp[r, at + w.score_start:at + w.score_end], ref_lp,
                                       atol=1e-5)
            np.testing.assert_array_equal(gr[r, at + w.score_start:at + w.score_end], ref_gr)
            k += 1
    assert not lp[seg == 0].any()


def test_choices_sharing_a_context_score_as_separate_pairs(tiny_checkpoint):
    """A TokenTree (context once, every choice a branch of it) gives each choice the score of
    its own (context, choice) pair, and a choice too long to share the window falls back to its
    own left-truncated windows."""
    import jax

    from gpt2model import Scorer, from_pretrained, get_tokenizer
    from gpt2model.batching import pack_branched_rows
    from gpt2model.scoring import TokenTree, choice_parts

    config, params = from_pretrained(tiny_checkpoint)
    tok = get_tokenizer(tiny_checkpoint)
    scorer = Scorer(config, params)
    ctx = tok.encode("Question: which one? Answer:")
    choices = [tok.encode(t) for t in (" yes", " no, not at all", " maybe",
                                       " a very long answer" * 15, " fine")]
    parts = choice_parts(ctx, choices, window=config.n_positions, eos_token_id=50256)
    assert [type(p).__name__ for p in parts] == ["TokenTree", "TokenWindow", "TokenTree"]
    assert parts[0].choices == (0, 1, 2) and parts[2].choices == (4,)
    ids, tgt, seg, branch, pos, offsets = pack_branched_rows([[p] for p in parts],
                                                             config.n_positions, len(parts))
    lp, greedy = jax.device_get(scorer(ids, tgt, seg, branch, pos))
    got = []
    for r, part in enumerate(parts):
        for lo, hi in part.spans:
            got.append(float(np.sum(lp[r, lo:hi], dtype=np.float64)))
    want = [s for s, _ in scorer.score_continuations([(ctx, c) for c in choices])]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert isinstance(parts[0], TokenTree) and parts[0].num_scored == sum(
        len(choices[i]) for i in parts[0].choices)


def test_the_head_runs_only_on_chunks_holding_a_scored_position(ckpt, monkeypatch):
    """`scored` leaves the scores it names unchanged (1e-6), reads 0/False elsewhere, and the LM
    head runs once per 128-position chunk holding a scored position, not once per chunk: a
    rolling window's context and all-padding rows cost no head. Counted at run time by a
    callback inside the head (it fires only where the chunk is computed)."""
    import gpt2model.scoring as scoring

    calls = []

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return head_logits(*args, **kwargs)

    head_logits = scoring.head_logits_by_vocab
    monkeypatch.setattr(scoring, "head_logits_by_vocab", counted)
    counting = Scorer(*from_pretrained(ckpt))  # traced after the patch
    rng = np.random.default_rng(3)
    ids = rng.integers(0, EOS, (8, 64)).astype(np.int32)  # 512 positions: 4 chunks of 2 rows
    tgt = rng.integers(0, EOS, (8, 64)).astype(np.int32)
    seg = np.ones((8, 64), np.int32)
    seg[6:] = 0  # two padding rows: the last chunk
    scored = np.zeros((8, 64), np.int32)
    scored[0, 60:] = 1  # a rolling window's last 4 targets: chunk 0
    scored[1] = 1  # chunk 0
    scored[5, :3] = 1  # chunk 2; chunk 1 (rows 2-3) holds only context
    lp_all, gr_all = jax.device_get(counting(ids, tgt, seg))
    assert len(calls) == 3  # the padding chunk skipped even without `scored`
    calls.clear()
    lp, gr = jax.device_get(counting(ids, tgt, seg, scored=scored))
    assert len(calls) == 2
    want = scored > 0
    np.testing.assert_allclose(lp[want], lp_all[want], atol=1e-6)
    np.testing.assert_array_equal(gr[want], gr_all[want])
    assert not lp[~want].any() and not gr[~want].any()
    assert lp_all[:6].all()  # without `scored` every token's prediction is there
