"""Study: attention only where the packing mask leaves work (issue 15), measured, not shipped.

    python -m bench.attention_study [--out bench/results/studies] [--repeats 3]

Two ways to stop paying a packed 1024-token row's whole causal triangle for short texts, each
measured against what gpt2model ships (`causal_attend`: 128-query blocks, each over the keys up
to its end, all rows batched):

1. **Skip key blocks, row by row** (`skipping_attend` below): each query block visits only the
   key blocks from the start of its first token's segment, with an online softmax, rows one
   after the other (`lax.map`: the skipped blocks differ by row). Timed at gpt2's shapes
   (8 x 1024 tokens, 12 heads of 64) on the pipeline corpus's packed rows and on rows of one
   text each, as one attention layer alone and as a 12-layer stack with the QKV and output
   matmuls around it (the model's depth).
2. **Shorter rows for short texts**: the packer's best-fit rows of 1024 against a second pool of
   256-token rows for texts that fit (a text first fills a gap in an open 1024 row, the short
   rows left at the end merge four to a long row), simulated on the window lengths of the
   synthetic pipeline corpus (200 and 5,000 documents) and of the real-text corpus (workload
   12) with each shape's tokens per second measured here on the whole scoring step.

Prints a markdown summary and writes the figures as JSON (machine and CPU flags included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import add_study_options, log, machine, spread, today, write_study
from bench.models import checkpoint

ROWS, LENGTH, HEADS, HEAD_DIM, EMBD, LAYERS = 8, 1024, 12, 64, 768, 12
SHORT = 256


def skipping_attend(q, k, v, mask, key_blocks, scale: float, block: int):
    """Attention of q, k, v [B, H, T, D] (T a multiple of `block`) under mask [B, T, T], each
    query block i visiting key blocks key_blocks[b, i]..i only (online softmax, row by row)."""
    import jax
    import jax.numpy as jnp

    _, h, t, d = q.shape
    low = jnp.finfo(jnp.float32).min

    def row(args):
        qr, kr, vr, mr, first = args
        outs = []
        for i in range(t // block):
            qi = qr[:, i * block:(i + 1) * block]

            def visit(j, state, i=i, qi=qi):
                top, total, acc = state
                kj, vj = (jax.lax.dynamic_slice_in_dim(a, j * block, block, axis=1)
                          for a in (kr, vr))
                mj = jax.lax.dynamic_slice(mr, (i * block, j * block), (block, block))
                s = jnp.where(mj[None], jnp.einsum("htd,hsd->hts", qi, kj) * scale, low)
                new_top = jnp.maximum(top, jnp.max(s, axis=-1))
                w = jnp.exp(s - new_top[..., None])
                keep = jnp.exp(top - new_top)
                acc = acc * keep[..., None] + jnp.einsum("hts,hsd->htd", w, vj)
                return new_top, total * keep + jnp.sum(w, axis=-1), acc

            state = (jnp.full((h, block), low), jnp.zeros((h, block)), jnp.zeros((h, block, d)))
            _, total, acc = jax.lax.fori_loop(jnp.minimum(first[i], i), i + 1, visit, state)
            outs.append(acc / total[..., None])
        return jnp.concatenate(outs, axis=1)

    return jax.lax.map(row, (q, k, v, mask, key_blocks))


def first_key_blocks(segment_ids, block: int):
    """[B, T] segment ids -> [B, T / block]: per query block, the key block where its first
    token's segment starts (segments are contiguous: no query of the block sees further back)."""
    import jax.numpy as jnp

    from gpt2model.model import segment_positions

    start = jnp.arange(segment_ids.shape[1])[None] - segment_positions(segment_ids)
    return (start[:, ::block] // block).astype(jnp.int32)


def window_lengths(token_counts: list[int], context: int) -> list[int]:
    """Each text's model-call lengths as the score job plans them (bos + rolling windows)."""
    from gpt2model.scoring import text_windows

    return [len(w.input_ids) for n in token_counts
            for w in text_windows(range(n), window=context, bos_token_id=0)]


def packed_batches(sizes: list[int], short: int | None, budget: int = ROWS * LENGTH
                   ) -> list[tuple[int, list[list[int]]]]:
    """(row length, rows of item sizes) batches: one pool of LENGTH rows (`short` None, what the
    job does), or with a pool of `short` rows as the module docstring says."""
    from gpt2model.batching import RowPacker

    long = RowPacker(LENGTH, budget // LENGTH)
    pool = RowPacker(short, budget // short) if short else None
    out: list[tuple[int, list[list[int]]]] = []
    for s in sizes:
        if pool is not None and s <= short and not any(
                used + s <= LENGTH for used, _ in long.open):
            out += [(short, b) for b in pool.add(s, s)]
        else:
            out += [(LENGTH, b) for b in long.add(s, s)]
    if pool is not None:
        rows = [r for b in pool.flush() for r in b]
        per = LENGTH // short
        for i in range(0, len(rows), per):
            merged = [x for r in rows[i:i + per] for x in r]
            long.open.append([sum(merged), merged])
    return out + [(LENGTH, b) for b in long.flush()]


def simulate(sizes: list[int], short: int | None, rates: dict[int, float], tail_steps: int = 4
             ) -> dict[str, Any]:
    """Computed tokens, real / computed, and the step seconds the measured rates predict."""
    from gpt2model.batching import step_rows

    computed = seconds = 0.0
    for length, rows in packed_batches(sizes, short):
        n = step_rows(len(rows), ROWS * LENGTH // length, tail_steps) * length
        computed += n
        seconds += n / rates[length]
    return {"computed": computed, "real_over_computed": sum(sizes) / computed,
            "predicted_s": seconds}


def segments_of(rows: list[list[int]]) -> np.ndarray:
    seg = np.zeros((ROWS, LENGTH), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            seg[r, at:at + s] = j + 1
            at += s
    return seg


def _timed(fn, args, repeats: int) -> dict[str, Any]:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return spread(times)


def attention_timings(layouts: dict[str, np.ndarray], repeats: int) -> list[dict[str, Any]]:
    """ms of causal_attend vs skipping_attend per layout, alone and in a 12-layer stack."""
    import jax
    import jax.numpy as jnp

    from gpt2model.model import QUERY_BLOCK, causal_attend

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((ROWS, LENGTH, EMBD)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((EMBD, 3 * EMBD)) * 0.02, jnp.float32)
               for _ in range(LAYERS)]
    scale = HEAD_DIM ** -0.5

    def stack(attend, layers):
        def fn(x, mask, first):
            for w in weights[:layers]:
                q, k, v = (a.reshape(ROWS, LENGTH, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
                           for a in jnp.split(x @ w, 3, axis=-1))
                out = attend(q, k, v, mask, first)
                x = x + out.transpose(0, 2, 1, 3).reshape(ROWS, LENGTH, EMBD) @ w[:, :EMBD].T
            return x
        return jax.jit(fn)

    forms = {"batched triangle (shipped)":
             lambda q, k, v, m, f: causal_attend(q, k, v, m, scale, jnp.float32),
             "row-by-row block skipping":
             lambda q, k, v, m, f: skipping_attend(q, k, v, m, f, scale, QUERY_BLOCK),
             "none (matmuls only)": lambda q, k, v, m, f: q}
    out = []
    for name, seg in layouts.items():
        s = jnp.asarray(seg)
        causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
        mask = (s[:, :, None] == s[:, None, :]) & (s[:, None, :] > 0) & causal[None]
        first = first_key_blocks(s, QUERY_BLOCK)
        visited = sum(int(i - min(int(f), i) + 1) for row in np.asarray(first)
                      for i, f in enumerate(row))
        for layers in (1, LAYERS):
            for form, attend in forms.items():
                t = _timed(stack(attend, layers), (x, mask, first), repeats)
                out.append({"layout": name, "layers": layers, "form": form, "seconds": t,
                            "segments_per_row": [int(len(np.unique(r[r > 0]))) for r in seg],
                            "blocks_visited": visited,
                            "blocks_triangle": ROWS * (LENGTH // QUERY_BLOCK) * (
                                LENGTH // QUERY_BLOCK + 1) // 2})
                log(f"attention {name} {layers} layer(s) {form}: {t['median'] * 1e3:.0f} ms")
    return out


def step_rates(model: Path, layouts: dict[int, np.ndarray], repeats: int) -> dict[int, float]:
    """Whole scoring step tokens/s (gpt2, float32) at ROWS*LENGTH tokens per row length."""
    from gpt2model import from_pretrained
    from gpt2model.scoring import Scorer

    config, params = from_pretrained(model)
    scorer = Scorer(config, params)
    rng = np.random.default_rng(1)
    rates = {}
    for length, seg in layouts.items():
        ids = rng.integers(0, config.vocab_size, seg.shape, dtype=np.int32)
        t = _timed(lambda i, s: scorer(i, i, s)[0], (ids, seg), repeats)
        rates[length] = seg.size / t["median"]
        log(f"scoring step {seg.shape[0]}x{length}: {rates[length]:,.0f} tokens/s")
    return rates


def run(repeats: int, cache_dir: Path) -> dict[str, Any]:
    from bench import corpus, realtext
    from gpt2model import get_tokenizer

    model = checkpoint("gpt2", cache_dir)
    tokenizer = get_tokenizer(model)
    synthetic = window_lengths([int(n) for n in corpus.lengths(200, LENGTH, 0)], LENGTH)
    docs, _ = realtext.collect(tokenizer, 20000, 0)
    real = window_lengths([d["tokens"] for d in docs], LENGTH)
    full = [(n, b) for n, b in packed_batches(synthetic, None) if len(b) == ROWS]
    layouts = {"pipeline corpus, packed batch 1": segments_of(full[0][1]),
               "pipeline corpus, packed batch 2": segments_of(full[1][1]),
               "one text per row": np.ones((ROWS, LENGTH), np.int32)}
    attention = attention_timings(layouts, repeats)
    from gpt2model.batching import RowPacker

    shorts = RowPacker(SHORT, ROWS * LENGTH // SHORT)  # the short texts alone, for the rate
    for s in synthetic:
        if s <= SHORT:
            shorts.add(s, s)
    short_rows = shorts.flush()[0]
    short_seg = np.zeros((ROWS * LENGTH // SHORT, SHORT), np.int32)
    for r, row in enumerate(short_rows):
        at = 0
        for j, s in enumerate(row):
            short_seg[r, at:at + s] = j + 1
            at += s
    rates = step_rates(model, {LENGTH: layouts["pipeline corpus, packed batch 1"],
                               SHORT: short_seg}, repeats)
    packing = []
    large = window_lengths([int(n) for n in corpus.lengths(5000, LENGTH, 0)], LENGTH)
    for name, sizes in (("synthetic pipeline corpus (200 documents)", synthetic),
                        ("synthetic pipeline corpus (5,000 documents)", large),
                        (f"real text ({len(docs)} documents)", real)):
        base = simulate(sizes, None, rates)
        two = simulate(sizes, SHORT, rates)
        packing.append({"corpus": name, "windows": len(sizes), "tokens": sum(sizes),
                        "one_length": base, "with_short_rows": two,
                        "speedup": base["predicted_s"] / two["predicted_s"]})
    return {"machine": machine(), "date": today(), "repeats": repeats, "attention": attention,
            "step_tokens_per_s": {str(k): v for k, v in rates.items()}, "packing": packing}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| layout | layers | form | ms (median, min–max) | key blocks visited / triangle |",
             "|---|---|---|---|---|"]
    for e in res["attention"]:
        s = e["seconds"]
        lines.append(f"| {e['layout']} ({len(e['segments_per_row'])} rows, segments "
                     f"{e['segments_per_row']}) | {e['layers']} | {e['form']} | "
                     f"{s['median'] * 1e3:.0f} ({s['min'] * 1e3:.0f}–{s['max'] * 1e3:.0f}) | "
                     f"{e['blocks_visited']} / {e['blocks_triangle']} |")
    rates = res["step_tokens_per_s"]
    lines += ["", f"Scoring step tokens/s: {ROWS}x{LENGTH} {rates[str(LENGTH)]:,.0f}, "
              f"{ROWS * LENGTH // SHORT}x{SHORT} {rates[str(SHORT)]:,.0f}.", "",
              "| corpus | windows | tokens | real/computed, 1024 rows | with 256 rows | "
              "predicted step s, 1024 rows | with 256 rows | speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    for p in res["packing"]:
        a, b = p["one_length"], p["with_short_rows"]
        lines.append(f"| {p['corpus']} | {p['windows']} | {p['tokens']:,} | "
                     f"{a['real_over_computed']:.3f} | {b['real_over_computed']:.3f} | "
                     f"{a['predicted_s']:.1f} | {b['predicted_s']:.1f} | {p['speedup']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_options(p)
    args = p.parse_args(argv)
    res = run(args.repeats, Path(args.cache_dir))
    write_study(res, args.out, "attention", markdown(res))


if __name__ == "__main__":
    main()
