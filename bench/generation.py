"""Workload 3: batched generation, ours (`Generator.decode_batch`) against transformers `generate`.

Both get the same prompts (random real-vocabulary tokens, 32..128 long), left-padded with
<|endoftext|> to the batch's longest prompt, with an attention mask; max 64 new tokens, greedy or
top-p 0.9 at temperature 1 (transformers' default top-k 50 switched off). Generated tokens/s
counts, per row, the tokens up to and including the first <|endoftext|> (at most 64), on both
sides alike. Time to first token is a separate decode with max_new_tokens=1, timed the same way
on both sides: the prefill plus choosing one token (our loop skips the forward pass after the
last token it needs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import log, rate, time_interleaved, torch_sync
from bench.models import checkpoint, free_torch, load_ours, load_peer

MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=0.9)}
# Fraction of rows whose first greedy token must match (full float32 only: bf16 and TF32
# rounding can flip near-ties).
MIN_GREEDY_AGREEMENT = 0.9


def prompts(n: int, vocab: int, seed: int, lo: int = 32, hi: int = 128
            ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (ids, mask) int32 [n, longest] of n prompts with lengths in lo..hi."""
    from gpt2model.batching import left_pad

    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, n)
    rows = [rng.integers(0, vocab - 1, k).tolist() for k in lens]
    return left_pad(rows, int(lens.max()), n, vocab - 1)


def generated(tokens: np.ndarray, eos: int) -> int:
    """Tokens produced per row up to and including the first eos, summed over rows."""
    total = 0
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        total += int(hits[0]) + 1 if hits.size else row.size
    return total


def run(ctx) -> dict[str, Any]:
    import torch

    from bench.common import jax_dtype
    from gpt2model import Generator, get_tokenizer
    from gpt2model.generation import record_seed

    entries = []
    dev = ctx.torch_device
    for size in ctx.gen_sizes:
        path = checkpoint(size, ctx.cache_dir)
        config, params = load_ours(path)
        tokenizer = get_tokenizer(path)
        eos = int(tokenizer.eos_token_id)
        for dtype in ctx.gen_dtypes:
            gen = Generator(config, params, tokenizer, dtype=jax_dtype(dtype))
            peer = load_peer(path, dtype, dev)
            for n in ctx.prompt_counts:
                ids, mask = prompts(n, config.vocab_size, n, *ctx.prompt_lengths)
                seeds = np.stack([record_seed(0, i) for i in range(n)])
                t_ids = torch.from_numpy(ids).long().to(dev)
                t_mask = torch.from_numpy(mask).long().to(dev)
                for mode, kw in MODES.items():
                    log(f"generation: {size} {dtype} {n} prompts {mode}")
                    ours = _ours(gen, ids, mask, seeds, kw)
                    theirs = _peer(peer, t_ids, t_mask, mode, kw, eos, dev)
                    full = time_interleaved({"ours": lambda f=ours: f(ctx.new_tokens),
                                             "peer": lambda f=theirs: f(ctx.new_tokens)},
                                            ctx.repeats)
                    first = time_interleaved({"ours": lambda f=ours: f(1),
                                              "peer": lambda f=theirs: f(1)}, ctx.repeats)
                    entries.append(_entry(size, dtype, n, mode, ids.shape[1], ctx.new_tokens,
                                          full, first, eos,
                                          strict=dtype == "float32" and dev == "cpu"))
                    del ours, theirs  # they hold the models
            del gen, peer
            free_torch(dev)
        del params
    return {"entries": entries}


def _ours(gen, ids, mask, seeds, kw):
    """k -> new tokens [B, k] from our jitted decode loop (one compile per k)."""
    from gpt2model import SamplingConfig

    def decode(k: int) -> np.ndarray:
        return gen.decode_batch(ids, mask, seeds, SamplingConfig(max_new_tokens=k, **kw))[0]

    return decode


def _peer(model, ids, mask, mode: str, kw, eos: int, device: str):
    """k -> new tokens [B, <=k] from transformers generate (its default dynamic KV cache)."""
    import torch

    sampling = ({"do_sample": False} if mode == "greedy" else
                {"do_sample": True, "top_p": kw["top_p"], "temperature": kw["temperature"],
                 "top_k": 0})

    def decode(k: int) -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                                 pad_token_id=eos, eos_token_id=eos, **sampling)
        torch_sync(device)
        return out[:, ids.shape[1]:].cpu().numpy()

    return decode


def _entry(size, dtype, n, mode, prompt_length, new_tokens, full, first, eos, strict: bool
           ) -> dict[str, Any]:
    ours_tokens = full["ours"].pop("warmup_result")
    peer_tokens = full["peer"].pop("warmup_result")
    for side in ("ours", "peer"):
        first[side].pop("warmup_result")
    e: dict[str, Any] = {"size": size, "dtype": dtype, "prompts": n, "mode": mode,
                         "prompt_length": prompt_length, "new_tokens": new_tokens}
    for side, toks in (("ours", ours_tokens), ("peer", peer_tokens)):
        count = generated(np.asarray(toks), eos)
        e[side] = {"tokens": count, "seconds": full[side]["seconds"],
                   "tokens_per_s": rate(count, full[side]["seconds"]),
                   "first_call_s": full[side]["first"],
                   "compile_s": max(0.0, full[side]["first"] - full[side]["seconds"]["median"]),
                   "ttft_s": first[side]["seconds"]}
    e["ratio"] = e["ours"]["tokens_per_s"]["median"] / e["peer"]["tokens_per_s"]["median"]
    if mode == "greedy":
        a, b = np.asarray(ours_tokens), np.asarray(peer_tokens)
        width = min(a.shape[1], b.shape[1])
        e["first_token_agreement"] = float(np.mean(a[:, 0] == b[:, 0]))
        e["token_agreement"] = float(np.mean(a[:, :width] == b[:, :width]))
        if strict and e["first_token_agreement"] < MIN_GREEDY_AGREEMENT:
            raise AssertionError(f"greedy first tokens differ from transformers: {e}")
    return e
