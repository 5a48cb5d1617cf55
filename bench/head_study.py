"""The LM head's orientation: h @ head.T ([C, V]) against head @ h.T ([V, C]), ad hoc.

`python -m bench.head_study`: head + log-softmax + target pick of 2,048 random gpt2-shaped
hidden states in row chunks (lax.map, as `scoring.head_scores` runs them), float32 and bfloat16
(bf16 operands, float32 result), for chunks of 32..512 rows; ms per call, median and min of 7,
the two forms timed interleaved.
Behind `model.head_logits_by_vocab` (BENCHMARKS.md, "Design measurements").
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import time_interleaved


def _head(h, targets, head, chunk: int, dtype, vocab_major: bool):
    import jax
    import jax.numpy as jnp

    e = h.shape[1]
    axis = 0 if vocab_major else 1

    def one(args):
        hc, tc = args
        if vocab_major:
            logits = jax.lax.dot_general(head, hc.astype(dtype), (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        else:
            logits = jax.lax.dot_general(hc.astype(dtype), head, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        top = jnp.max(logits, axis)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - jnp.expand_dims(top, axis)), axis))
        picked = jnp.take_along_axis(logits, jnp.expand_dims(tc, axis), axis).squeeze(axis)
        return picked - lse, picked >= top

    return jax.lax.map(one, (h.reshape(-1, chunk, e), targets.reshape(-1, chunk)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="32,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    n, e, v = 2048, 768, 50257
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        head = jnp.asarray(rng.normal(size=(v, e)) * 0.02, dtype)
        for chunk in (int(c) for c in args.chunks.split(",")):
            fns = {}
            for vocab_major, form in ((False, "[C, V] h @ head.T"), (True, "[V, C] head @ h.T")):
                fn = jax.jit(lambda a, b, c, chunk=chunk, vm=vocab_major, dt=dtype:
                             _head(a, b, c, chunk, dt, vm))
                fns[form] = lambda fn=fn, w=head: jax.block_until_ready(fn(h, targets, w))
            for form, timed in time_interleaved(fns, args.repeats).items():
                med, low = timed["seconds"]["median"], timed["seconds"]["min"]
                print(f"{jnp.dtype(dtype).name:9s} chunk {chunk:4d} {form}: {med * 1e3:7.1f} ms"
                      f" (min {low * 1e3:7.1f}), {2 * n * e * v / med / 1e9:6.1f} GFLOP/s",
                      flush=True)

if __name__ == "__main__":
    main()
