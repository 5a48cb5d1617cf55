"""Workload 1: the scoring model step alone, ours against transformers, same batches and dtype.

Ours: `gpt2model.Scorer` (jitted forward + float32 log_softmax + gather), inputs already on the
device. Peer: transformers `GPT2LMHeadModel` (sdpa attention) under `torch.inference_mode`,
`log_softmax(logits.float()).gather(targets)`, inputs already on its device. Each batch is
full (no padding), so tokens/s counts every position. Before timing, the two sides' log-probs of
the warm-up call are compared; a mismatch fails the workload.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import log, rate, time_interleaved, torch_sync
from bench.models import checkpoint, free_torch, load_ours, load_peer, scorer

# Agreement required between ours and the peer. With GPT-2's random init the log-probs are
# about -11 with a spread of ~0.55 at gpt2 width, so a wrong model is far outside these; at
# gpt2 size float32 agrees to ~3e-6 and bfloat16 to a mean of ~5e-3 (correlation 0.9999).
# On a GPU float32 matmuls are TF32 on both sides, so they get the reduced-precision test.
FP32_MAX_ABS = 2e-3
LOW_MIN_CORR = 0.99
LOW_MAX_MEAN_ABS = 0.05


def make_batch(length: int, rows: int, vocab: int, seed: int) -> tuple[np.ndarray, ...]:
    """(ids, targets, mask) int32 [rows, length]: random real-vocab tokens, targets shifted."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, vocab, (rows, length + 1), dtype=np.int32)
    return seq[:, :-1].copy(), seq[:, 1:].copy(), np.ones((rows, length), np.int32)


def peer_logprobs(model, ids, targets, mask):
    """What a transformers user does to get per-token log-probs, best way."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def check(ours: np.ndarray, peer: np.ndarray, strict: bool) -> dict[str, Any]:
    """Agreement of the two sides' log-probs; raises when they disagree beyond noise.

    strict: full float32 on both sides (max abs difference); else bf16/TF32 (correlation and
    mean abs difference)."""
    diff = np.abs(ours.astype(np.float64) - peer.astype(np.float64))
    corr = float(np.corrcoef(ours.ravel(), peer.ravel())[0, 1]) if ours.size > 1 else 1.0
    out = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "corr": corr, "mean_logprob": float(ours.mean())}
    if strict:
        ok = out["max_abs_diff"] <= FP32_MAX_ABS
    else:
        ok = corr >= LOW_MIN_CORR and out["mean_abs_diff"] <= LOW_MAX_MEAN_ABS
    if not ok:
        raise AssertionError(f"ours and transformers disagree on log-probs: {out}")
    return out


def run(ctx) -> dict[str, Any]:
    import jax
    import torch

    entries = []
    dev = ctx.torch_device
    for size in ctx.sizes:
        path = checkpoint(size, ctx.cache_dir)
        config, params = load_ours(path)
        for dtype in ctx.dtypes:
            score = scorer(config, params, dtype)
            peer = load_peer(path, dtype, dev)
            for i, length in enumerate(ctx.lengths):
                rows = max(1, ctx.batch_tokens // length)
                ids, tgt, mask = make_batch(length, rows, config.vocab_size, seed=i)
                j_args = [jax.device_put(a) for a in (ids, tgt, mask)]
                t_args = [torch.from_numpy(a).long().to(dev) for a in (ids, tgt, mask)]

                def ours_step(score=score, j_args=j_args):
                    return jax.block_until_ready(score(*j_args))[0]

                def peer_step(peer=peer, t_args=t_args):
                    out = peer_logprobs(peer, *t_args)
                    torch_sync(dev)
                    return out

                log(f"scoring: {size} {dtype} {rows}x{length}")
                timed = time_interleaved({"ours": ours_step, "peer": peer_step}, ctx.repeats)
                agreement = check(np.asarray(timed["ours"].pop("warmup_result")),
                                  timed["peer"].pop("warmup_result").float().cpu().numpy(),
                                  strict=dtype == "float32" and dev == "cpu")
                tokens = rows * length
                entry = {"size": size, "dtype": dtype, "length": length, "rows": rows,
                         "tokens": tokens, "check": agreement}
                for side in ("ours", "peer"):
                    t = timed[side]
                    entry[side] = {"seconds": t["seconds"],
                                   "tokens_per_s": rate(tokens, t["seconds"]),
                                   "first_call_s": t["first"],
                                   "compile_s": max(0.0, t["first"] - t["seconds"]["median"])}
                entry["ratio"] = (entry["ours"]["tokens_per_s"]["median"]
                                  / entry["peer"]["tokens_per_s"]["median"])
                entry["ours"]["compiles"] = score.compile_count
                entries.append(entry)
                del j_args, t_args, ours_step, peer_step
            del score, peer
            free_torch(dev)
        del params
    return {"entries": entries, "aggregate": aggregate(entries)}


def aggregate(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (size, dtype): all lengths' tokens over the sum of their median times, both sides."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["size"], e["dtype"]), []).append(e)
    out = []
    for (size, dtype), es in groups.items():
        tokens = sum(e["tokens"] for e in es)
        ours = tokens / sum(e["ours"]["seconds"]["median"] for e in es)
        peer = tokens / sum(e["peer"]["seconds"]["median"] for e in es)
        out.append({"size": size, "dtype": dtype, "ours_tokens_per_s": ours,
                    "peer_tokens_per_s": peer, "ratio": ours / peer,
                    "lengths": [e["length"] for e in es]})
    return out
