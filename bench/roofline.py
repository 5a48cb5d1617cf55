"""Workload 5: model FLOPs per token, the machine's measured matmul ceiling, and MFU.

FLOPs of one forward token of a GPT-2 with n_layer layers, width d, vocabulary V, at sequence
length T (Kaplan et al. 2020, "Scaling Laws", table 1, plus the LM head):

    2 * N_nonembedding          every weight of the blocks is one multiply-add per token
  + 2 * n_layer * T * d         attention scores QK^T and the weighted sum AV: 2*T*d each per
                                layer for a query that sees all T keys, halved because a causal
                                query sees T/2 keys on average
  + 2 * d * V                   the LM head (tied to wte, so not in N_nonembedding)

N_nonembedding = n_layer * (12 d^2 + 13 d) + 2 d: per block c_attn (d x 3d + 3d), attn c_proj
(d x d + d), mlp c_fc (d x 4d + 4d), mlp c_proj (4d x d + d) and two layer norms (4d), plus
ln_f. Biases and norms are counted as Kaplan counts them (they are < 0.2% of the total);
softmax, GELU and the log-softmax over the vocabulary are not counted. The ceiling is the rate
of one large square matmul in JAX, float32 and bfloat16 (bf16 operands with a float32 result,
exactly what the model's matmuls ask for), measured in the same run; MFU = tokens/s * FLOPs per
token / that rate.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import log, spread

FORMULA = ("FLOPs/token = 2*N_nonembedding + 2*n_layer*T*d_model (causal attention) "
           "+ 2*d_model*vocab (LM head); N_nonembedding = n_layer*(12*d^2 + 13*d) + 2*d")


def non_embedding_params(config) -> int:
    d, inner = config.n_embd, config.inner_dim
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d) + 4 * d
    return config.n_layer * per_layer + 2 * d


def flops_per_token(config, length: int) -> float:
    """Forward FLOPs per token at sequence length `length` (see the module docstring)."""
    return (2.0 * non_embedding_params(config) + 2.0 * config.n_layer * length * config.n_embd
            + 2.0 * config.n_embd * config.vocab_size)


def jax_matmul_rate(dtype: str, n: int, repeats: int, calls: int) -> dict[str, Any]:
    """FLOP/s of an [n, n] @ [n, n] matmul in JAX; `calls` dispatched back to back per repeat
    (so launch overhead on a GPU is amortized), float32 accumulation for bf16 operands."""
    import jax
    import jax.numpy as jnp

    from bench.common import jax_dtype

    dt = jax_dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [mm(a, b) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
        del outs
    seconds = spread(times)
    flop = 2.0 * n ** 3
    return {"n": n, "calls_per_repeat": calls, "seconds": seconds,
            "flops": {"median": flop / seconds["median"], "min": flop / seconds["max"],
                      "max": flop / seconds["min"]}}


def torch_matmul_rate(dtype: str, n: int, repeats: int, calls: int, device: str
                      ) -> dict[str, Any]:
    """The same matmul in PyTorch (for reference: the ceiling MFU uses is JAX's)."""
    import torch

    from bench.common import torch_dtype, torch_setup, torch_sync

    torch_setup(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype(dtype))
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype(dtype))
    with torch.inference_mode():
        torch.mm(a, b)
        torch_sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b)
            torch_sync(device)
            times.append((time.perf_counter() - start) / calls)
    seconds = spread(times)
    flop = 2.0 * n ** 3
    return {"n": n, "calls_per_repeat": calls, "seconds": seconds,
            "flops": {"median": flop / seconds["median"], "min": flop / seconds["max"],
                      "max": flop / seconds["min"]}}


def run(ctx) -> dict[str, Any]:
    """Measure the ceilings; MFU of the scoring figures is filled in by `annotate`."""
    out: dict[str, Any] = {"formula": FORMULA, "jax": {}, "torch": {}, "flops_per_token": {}}
    for dtype in ctx.dtypes:
        log(f"roofline: {dtype} matmul n={ctx.matmul_n}")
        out["jax"][dtype] = jax_matmul_rate(dtype, ctx.matmul_n, ctx.repeats, ctx.matmul_calls)
        out["torch"][dtype] = torch_matmul_rate(dtype, ctx.matmul_n, ctx.repeats,
                                                ctx.matmul_calls, ctx.torch_device)
    from bench.models import model_config

    for size in ctx.sizes:
        cfg = model_config(size)
        out["flops_per_token"][size] = {
            "non_embedding_params": non_embedding_params(cfg),
            "by_length": {str(t): flops_per_token(cfg, t) for t in ctx.lengths},
        }
    return out


def annotate(results: dict[str, Any]) -> None:
    """Add MFU (fraction of the JAX matmul ceiling at the same dtype) to scoring entries."""
    roof = results.get("workloads", {}).get("roofline", {})
    scoring = results.get("workloads", {}).get("scoring", {})
    if "jax" not in roof or "entries" not in scoring:
        return
    from bench.models import model_config

    for e in scoring["entries"]:
        ceiling = roof["jax"].get(e["dtype"], {}).get("flops", {}).get("median")
        if not ceiling:
            continue
        fpt = flops_per_token(model_config(e["size"]), e["length"])
        e["flops_per_token"] = fpt
        for side in ("ours", "peer"):
            e[side]["mfu"] = e[side]["tokens_per_s"]["median"] * fpt / ceiling
    for a in scoring.get("aggregate", []):
        ceiling = roof["jax"].get(a["dtype"], {}).get("flops", {}).get("median")
        es = [e for e in scoring["entries"] if "flops_per_token" in e
              and (e["size"], e["dtype"]) == (a["size"], a["dtype"])]
        if not ceiling or not es:
            continue
        flop = sum(e["tokens"] * e["flops_per_token"] for e in es)
        for side in ("ours", "peer"):
            a[f"{side}_mfu"] = flop / sum(e[side]["seconds"]["median"] for e in es) / ceiling
