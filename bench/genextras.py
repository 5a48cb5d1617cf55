"""Workload 13: beam search against transformers, and one prefill for all samples of a prompt.

Beam search: the generation workload's prompts (random real-vocabulary tokens), 4 beams, one
returned sequence, greedy, ours (`gpt2model.beam_search`, one jitted loop over rows x beams)
against `transformers.generate(num_beams=4)`, timed interleaved; tokens/s counts each
returned sequence's tokens (eos included) alike on both sides.

Shared prefill: `Generator.run_batch` with 8 samples of each of P prompts against P x 8
distinct prompts of the same lengths, both with max_new_tokens=1 (so the call is the prefill
plus one token): the shared run prefills P rows, the distinct one 8P; reported per sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import log, rate, time_interleaved, torch_sync
from bench.generation import prompts
from bench.models import checkpoint, free_torch, load_ours, load_peer

BEAMS = 4
SAMPLES = 8


def run(ctx) -> dict[str, Any]:
    import torch

    from bench.common import jax_dtype
    from gpt2model import Generator, SamplingConfig, get_tokenizer
    from gpt2model.beam_search import BeamSettings, beam_search
    from gpt2model.generation import Sample

    size, dtype, dev = ctx.gen_sizes[0], ctx.gen_dtypes[0], ctx.torch_device
    path = checkpoint(size, ctx.cache_dir)
    config, params = load_ours(path)
    tokenizer = get_tokenizer(path)
    eos = int(tokenizer.eos_token_id)
    n = ctx.prompt_counts[0]
    new = max(2, ctx.new_tokens // 2)
    ids, mask = prompts(n, config.vocab_size, 11, *ctx.prompt_lengths)
    rows = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]
    settings = BeamSettings(num_beams=BEAMS, max_new_tokens=new)
    peer = load_peer(path, dtype, dev)
    t_ids = torch.from_numpy(ids).long().to(dev)
    t_mask = torch.from_numpy(mask).long().to(dev)

    def ours():
        return beam_search(config, params, rows, settings, eos, jax_dtype(dtype),
                           prompt_length=ids.shape[1])

    def theirs():
        with torch.inference_mode():
            out = peer.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=new,
                                num_beams=BEAMS, do_sample=False, pad_token_id=eos,
                                eos_token_id=eos)
        torch_sync(dev)
        return out[:, ids.shape[1]:].cpu().numpy()

    log(f"beam search: {size} {dtype} {n} prompts, {BEAMS} beams, {new} new tokens")
    timed = time_interleaved({"ours": ours, "peer": theirs}, ctx.repeats)
    ours_ids = [h[0].token_ids for h in timed["ours"].pop("warmup_result")]
    peer_ids = [[int(t) for t in row] for row in timed["peer"].pop("warmup_result")]
    peer_ids = [r[:r.index(eos)] if eos in r else r for r in peer_ids]
    counts = {"ours": sum(min(len(r) + 1, new) for r in ours_ids),
              "peer": sum(min(len(r) + 1, new) for r in peer_ids)}
    beam = {side: {"tokens": counts[side], "seconds": timed[side]["seconds"],
                   "tokens_per_s": rate(counts[side], timed[side]["seconds"])}
            for side in ("ours", "peer")}
    beam["ratio"] = beam["ours"]["tokens_per_s"]["median"] / beam["peer"]["tokens_per_s"][
        "median"]
    beam["identical_rows"] = sum(a == b for a, b in zip(ours_ids, peer_ids, strict=True))
    beam.update(prompts=n, beams=BEAMS, new_tokens=new, size=size, dtype=dtype)
    peer = None  # noqa: F841 - frees the model
    free_torch(dev)

    gen = Generator(config, params, tokenizer, dtype=jax_dtype(dtype))
    one = SamplingConfig(max_new_tokens=1, temperature=1.0)
    p = max(1, n // SAMPLES)
    shared = [Sample(f"r{i}", s, tuple(rows[i])) for i in range(p) for s in range(SAMPLES)]
    # The same lengths, every sample its own prompt (a shifted copy of the shared one).
    distinct = [Sample(f"d{i}-{s}", 0, tuple((t + s + 1) % (config.vocab_size - 1)
                                              for t in rows[i]))
                for i in range(p) for s in range(SAMPLES)]
    prefilled = {}

    def call(samples, name):
        def go():
            out = gen.run_batch(samples, one, seed=0, length=ids.shape[1], rows=len(samples))
            prefilled[name] = gen.last_prefill_rows
            return out
        return go

    log(f"shared prefill: {p} prompts x {SAMPLES} samples")
    t = time_interleaved({"shared": call(shared, "shared"),
                          "distinct": call(distinct, "distinct")}, ctx.repeats)
    per = {k: t[k]["seconds"]["median"] / len(shared) for k in ("shared", "distinct")}
    prefill = {"prompts": p, "samples_per_prompt": SAMPLES, "prefill_rows": prefilled,
               "seconds_per_sample": per, "ratio": per["shared"] / per["distinct"],
               "seconds": {k: t[k]["seconds"] for k in ("shared", "distinct")}}
    varied = run_varied(ctx) if hasattr(Generator, "run_stream") else None
    return {"beam": beam, "prefill": prefill, "varied": varied}


VARIED_NEW = 128
VARIED_SLOTS = 16
VARIED_MEAN = 40  # tokens: geometric lengths of this mean spread over 4..128


def run_varied(ctx) -> dict[str, Any]:
    """Output lengths that vary: sampling (temperature 1) with <|endoftext|>'s logit raised
    so rows end after a geometric number of tokens (the bias bisected on the first 2 x slots
    prompts to a mean within 10% of VARIED_MEAN, capped by max_new_tokens 128), the same bias
    on both sides (transformers' sequence_bias). Ours
    streams the prompts through refilled slots (`Generator.run_stream`) and, for comparison,
    in fixed batches (`run_batch`); transformers generates the same fixed batches. Tokens/s
    counts each row's tokens up to and including its eos, alike on all sides."""
    import torch

    from bench.common import jax_dtype
    from gpt2model import Generator, SamplingConfig, get_tokenizer
    from gpt2model.generation import Sample

    size, dtype, dev = ctx.gen_sizes[0], ctx.gen_dtypes[0], ctx.torch_device
    path = checkpoint(size, ctx.cache_dir)
    config, params = load_ours(path)
    tokenizer = get_tokenizer(path)
    eos = int(tokenizer.eos_token_id)
    n = max(ctx.prompt_counts)
    new = VARIED_NEW if not ctx.quick else 16
    slots = min(VARIED_SLOTS, n)
    ids, mask = prompts(n, config.vocab_size, 17, *ctx.prompt_lengths)
    rows = [tuple(row[m.astype(bool)].tolist()) for row, m in zip(ids, mask, strict=True)]
    samples = [Sample(f"v{i}", 0, r) for i, r in enumerate(rows)]
    gen = Generator(config, params, tokenizer, dtype=jax_dtype(dtype))
    length = ids.shape[1]

    def settings(bias: float) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=new, temperature=1.0, logit_bias=((eos, bias),))

    probe = samples[:2 * slots]
    low, high = 0.0, 16.0  # bisect the bias for a mean length near VARIED_MEAN
    for _ in range(1 if ctx.quick else 6):
        bias = (low + high) / 2
        got = gen.run_stream(probe, settings(bias), seed=0, slots=slots, prompt_length=length)
        mean = float(np.mean([min(len(g.token_ids) + 1, new) for g in got]))
        if abs(mean - VARIED_MEAN) <= VARIED_MEAN / 10:
            break
        low, high = (bias, high) if mean > VARIED_MEAN else (low, bias)
    log(f"varied lengths: {size} {dtype} {n} prompts, eos bias {bias} (probe mean {mean:.0f})")
    s = settings(bias)
    batches = [samples[i:i + slots] for i in range(0, n, slots)]
    live = {}

    def stream():
        out = gen.run_stream(samples, s, seed=0, slots=slots, prompt_length=length)
        live["stream"] = gen.last_live_fraction
        return [len(g.token_ids) + (g.finish_reason == "eos") for g in out]

    def fixed():
        out, fracs = [], []
        for b in batches:
            got = gen.run_batch(b, s, seed=0, length=length, rows=slots)
            fracs.append(gen.last_live_fraction)
            out += [len(g.token_ids) + (g.finish_reason == "eos") for g in got]
        live["fixed"] = float(np.mean(fracs))
        return out

    peer = load_peer(path, dtype, dev)

    def theirs():
        counts = []
        for i in range(0, n, slots):
            t_ids = torch.from_numpy(ids[i:i + slots]).long().to(dev)
            t_mask = torch.from_numpy(mask[i:i + slots]).long().to(dev)
            with torch.inference_mode():
                out = peer.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=new,
                                    do_sample=True, temperature=1.0, top_k=0, pad_token_id=eos,
                                    eos_token_id=eos, sequence_bias={(eos,): bias})
            torch_sync(dev)
            for row in out[:, ids.shape[1]:].tolist():
                counts.append(row.index(eos) + 1 if eos in row else len(row))
        return counts

    timed = time_interleaved({"stream": stream, "fixed": fixed, "peer": theirs}, ctx.repeats)
    out: dict[str, Any] = {"prompts": n, "slots": slots, "max_new_tokens": new, "eos_bias": bias,
                           "size": size, "dtype": dtype, "live_fraction": live}
    for side in ("stream", "fixed", "peer"):
        counts = timed[side].pop("warmup_result")
        out[side] = {"tokens": int(sum(counts)), "mean_length": float(np.mean(counts)),
                     "seconds": timed[side]["seconds"],
                     "tokens_per_s": rate(int(sum(counts)), timed[side]["seconds"])}
    out["ratio"] = out["stream"]["tokens_per_s"]["median"] / out["peer"]["tokens_per_s"]["median"]
    out["ratio_fixed"] = (out["fixed"]["tokens_per_s"]["median"]
                          / out["peer"]["tokens_per_s"]["median"])
    return out
