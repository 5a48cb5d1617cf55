"""The kernel study's worker process: each form of one matmul, built, compiled, checked, timed.

    python -m bench.kernel_forms   (started by bench.kernels under one XLA_FLAGS setting)

Serves JSON lines on stdin/stdout; see `worker`. The forms are described in bench/kernels.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from bench.hlo import fingerprint, kernel_label
from bench.kernels import CHECK_ROWS, MATMULS, causal_blocks


def _forms(name: str, spec: dict[str, int]):
    """{form: (fn, args, check)} for one matmul; check(args, out) -> (got, want) slices."""
    import jax
    import jax.numpy as jnp

    from gpt2model.model import head_logits, head_logits_by_vocab, matmul

    f32, bf16 = jnp.float32, jnp.bfloat16
    rng = np.random.default_rng(MATMULS.index(name))
    b, t, e, f = spec["rows"], spec["length"], spec["n_embd"], spec["inner"]
    h, d, n = spec["n_head"], spec["head_dim"], CHECK_ROWS

    def dot_out(x, w, pet):  # dot_general contracting x's last axis with w's first
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=pet)

    def f64(a):
        return np.asarray(jnp.asarray(a, f32), np.float64)

    out: dict[str, Any] = {}
    if name in ("c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj"):
        k, m = {"c_attn": (e, 3 * e), "attn_c_proj": (e, e), "mlp_c_fc": (e, f),
                "mlp_c_proj": (f, e)}[name]
        x = jnp.asarray(rng.normal(size=(b, t, k)), f32)  # the step's activations: float32
        w32 = jnp.asarray(rng.normal(size=(k, m)) * 0.02, f32)
        w16 = w32.astype(bf16)  # compute_params stores bf16 weights

        def check(args, o, wt=False):
            w = f64(args[1])
            return f64(o)[0, :n], f64(args[0])[0, :n] @ (w.T if wt else w)

        out["f32"] = (lambda x, w: matmul(x, w, f32), (x, w32), check)
        out["bf16>f32"] = (lambda x, w: matmul(x, w, bf16), (x, w16), check)
        out["bf16"] = (lambda x, w: dot_out(x.astype(bf16), w, None), (x, w16), check)
        out["f32 einsum"] = (lambda x, w: jnp.einsum("bte,ef->btf", x, w), (x, w32), check)
        out["f32 2-D"] = (lambda x, w: matmul(x.reshape(b * t, k), w, f32).reshape(b, t, m),
                          (x, w32), check)
        out["f32 w[out,in]"] = (
            lambda x, w: jax.lax.dot_general(x, w, (((2,), (1,)), ((), ()))),
            (x, jnp.asarray(w32.T)), lambda a, o: check(a, o, wt=True))
    elif name == "lm_head":
        c, v = spec["chunk"], spec["vocab"]
        hc = jnp.asarray(rng.normal(size=(c, e)), f32)  # ln_f output: float32
        wte = jnp.asarray(rng.normal(size=(v, e)) * 0.02, f32)
        wte16 = wte.astype(bf16)

        def check(args, o, ev=False):
            w = f64(args[1])
            return f64(o)[:n], f64(args[0])[:n] @ (w if ev else w.T)

        def check_ev(args, o):
            return check(args, o, ev=True)

        def check_vc(args, o):
            return check(args, f64(o).T)

        def by_input(a, w, dt):  # h [C, E] @ head [E, V]
            return jax.lax.dot_general(a.astype(dt), w, (((1,), (0,)), ((), ())),
                                       preferred_element_type=f32)

        out["f32"] = (lambda a, w: head_logits(a, w, f32), (hc, wte), check)
        out["bf16>f32"] = (lambda a, w: head_logits(a, w, bf16), (hc, wte16), check)
        out["bf16"] = (lambda a, w: jax.lax.dot_general(
            a.astype(bf16), w, (((1,), (1,)), ((), ()))), (hc, wte16), check)
        out["f32 einsum"] = (lambda a, w: jnp.einsum("ce,ve->cv", a, w), (hc, wte), check)
        out["f32 [E,V]"] = (lambda a, w: by_input(a, w, f32), (hc, jnp.asarray(wte.T)), check_ev)
        out["bf16>f32 [E,V]"] = (lambda a, w: by_input(a, w, bf16), (hc, jnp.asarray(wte16.T)),
                                 check_ev)
        out["f32 [V,C]"] = (lambda a, w: head_logits_by_vocab(a, w, f32), (hc, wte), check_vc)
        out["bf16>f32 [V,C]"] = (lambda a, w: head_logits_by_vocab(a, w, bf16), (hc, wte16),
                                 check_vc)
    else:
        blocks = causal_blocks(spec)
        s_max = blocks[-1][2]
        base = rng.normal(size=(b, h, s_max, d))

        def heads(dt, layout):  # [B, H, S, D] in the given layout
            a = jnp.asarray(base, dt)
            return {"bhsd": a, "bshd": a.transpose(0, 2, 1, 3), "bhds": a.transpose(0, 1, 3, 2)
                    }[layout]

        if name == "attn_scores":
            def build(dt, pet, layout_q, layout_k, eq):
                q, k = heads(dt, layout_q), heads(dt, layout_k)
                qs = tuple(q[:, i:i + nq] if layout_q == "bshd" else q[:, :, i:i + nq]
                           for i, nq, _ in blocks)
                ks = tuple(k[:, :s] if layout_k == "bshd" else
                           (k[..., :s] if layout_k == "bhds" else k[:, :, :s])
                           for _, _, s in blocks)

                def fn(qs, ks):
                    return [jnp.einsum(eq, a, bb, preferred_element_type=pet)
                            for a, bb in zip(qs, ks, strict=True)]

                def check(args, o):  # batch 0, head 0 of the last block: [q, s]
                    qq, kk = f64(args[0][-1]), f64(args[1][-1])
                    qq = qq[0, :, 0] if layout_q == "bshd" else qq[0, 0]
                    kk = kk[0, :, 0] if layout_k == "bshd" else (
                        kk[0, 0].T if layout_k == "bhds" else kk[0, 0])
                    return f64(o[-1])[0, 0], qq @ kk.T

                return fn, (qs, ks), check

            out["f32"] = build(f32, f32, "bhsd", "bhsd", "bhtd,bhsd->bhts")
            out["bf16>f32"] = build(bf16, f32, "bhsd", "bhsd", "bhtd,bhsd->bhts")
            out["bf16"] = build(bf16, None, "bhsd", "bhsd", "bhtd,bhsd->bhts")
            out["f32 [B,T,H,D]"] = build(f32, f32, "bshd", "bshd", "bthd,bshd->bhts")
            out["f32 k[B,H,D,S]"] = build(f32, f32, "bhsd", "bhds", "bhtd,bhds->bhts")
        else:
            wbase = [np.abs(rng.normal(size=(b, h, nq, s))) / s for _, nq, s in blocks]

            def build(dt, pet, layout_v, eq):
                v = heads(dt, layout_v)
                ws = tuple(jnp.asarray(w, dt) for w in wbase)
                vs = tuple(v[:, :s] if layout_v == "bshd" else
                           (v[..., :s] if layout_v == "bhds" else v[:, :, :s])
                           for _, _, s in blocks)

                def fn(ws, vs):
                    return [jnp.einsum(eq, a, bb, preferred_element_type=pet)
                            for a, bb in zip(ws, vs, strict=True)]

                def check(args, o):  # batch 0, head 0 of the last block: [q, d]
                    ww, vv = f64(args[0][-1])[0, 0], f64(args[1][-1])
                    vv = vv[0, :, 0] if layout_v == "bshd" else (
                        vv[0, 0].T if layout_v == "bhds" else vv[0, 0])
                    got = f64(o[-1])
                    got = got[0, :, 0] if eq.endswith("bthd") else got[0, 0]
                    return got, ww @ vv

                return fn, (ws, vs), check

            out["f32"] = build(f32, f32, "bhsd", "bhts,bhsd->bhtd")
            out["bf16>f32"] = build(bf16, f32, "bhsd", "bhts,bhsd->bhtd")
            out["bf16"] = build(bf16, None, "bhsd", "bhts,bhsd->bhtd")
            out["f32 [B,T,H,D]"] = build(f32, f32, "bshd", "bhts,bshd->bthd")
            out["f32 v[B,H,D,S]"] = build(f32, f32, "bhds", "bhts,bhds->bhtd")
    return out


class _Forms:
    """The worker's state: the compiled forms of the matmul loaded last."""

    def __init__(self) -> None:
        self.compiled: dict[str, tuple[Any, Any]] = {}

    def load(self, spec: dict[str, int], matmul: str) -> dict[str, Any]:
        import jax

        self.compiled = {}
        rows = []
        for form, (fn, args, check) in _forms(matmul, spec).items():
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            result = jax.block_until_ready(compiled(*args))
            warm_s = time.perf_counter() - start
            got, want = check(args, result)
            err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
            self.compiled[form] = (compiled, args)
            text = compiled.as_text()
            rows.append({"form": form, "kernel": kernel_label(text), "program": fingerprint(text),
                         "compile_s": compile_s, "warm_s": warm_s, "rel_err": err})
            del result
        return {"forms": rows}

    def load_step(self, model: str, rows: int, length: int, dtypes: list[str]
                  ) -> dict[str, Any]:
        """The whole scoring step (`Scorer`, as workload 1 calls it) per dtype, compiled."""
        import jax

        from bench.common import jax_dtype
        from bench.scoring import make_batch
        from gpt2model import Scorer, from_pretrained

        self.compiled = {}
        config, params = from_pretrained(model)
        ids, tgt, mask = (jax.device_put(a) for a in make_batch(length, rows, config.vocab_size,
                                                                   seed=0))
        out = []
        for dtype in dtypes:
            score = Scorer(config, params, dtype=jax_dtype(dtype))
            start = time.perf_counter()
            lp = np.asarray(jax.block_until_ready(score(ids, tgt, mask))[0])
            self.compiled[f"step {dtype}"] = (score, (ids, tgt, mask))
            out.append({"form": f"step {dtype}", "first_s": time.perf_counter() - start,
                        "mean_logprob": float(lp.mean())})
        return {"forms": out}

    def time(self, form: str, calls: int) -> dict[str, Any]:
        import jax

        compiled, args = self.compiled[form]
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(compiled(*args))
        return {"seconds": (time.perf_counter() - start) / calls}


def worker() -> None:
    """Serve {"op": "load" | "time" | "clear" | "quit", ...} lines on stdin, one JSON reply per
    line on stdout (XLA_FLAGS as the parent set them)."""
    import jax

    state = _Forms()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the reply channel
    out.write(json.dumps({"ready": True, "flags": os.environ.get("XLA_FLAGS", ""),
                          "backend": jax.default_backend()}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "quit":
                break
            if msg["op"] == "load":
                reply = state.load(msg["spec"], msg["matmul"])
            elif msg["op"] == "load_step":
                reply = state.load_step(msg["model"], msg["rows"], msg["length"], msg["dtypes"])
            elif msg["op"] == "time":
                reply = state.time(msg["form"], msg["calls"])
            else:
                state.compiled = {}
                reply = {}
        except Exception as err:  # the parent reports it; the worker stays up
            reply = {"error": f"{type(err).__name__}: {err}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    worker()
