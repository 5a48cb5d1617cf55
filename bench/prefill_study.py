"""Study: generation's prefill pass size on CPU (`batching.CPU_STEP_TOKENS`) and the greedy pick.

    python -m bench.prefill_study [--budgets none,1024,2048,4096] [--prompts 64] [--repeats 3]
        [--out bench/results/studies]

1. **Prefill per pass size**: gpt2 random weights, `Generator(prefill_tokens=budget)` on
   workload 3's prompts (`--prompts` of 32..128 random tokens, left-padded), max_new_tokens=1,
   greedy: the prefill plus the first token, what workload 3 reports as time to first token.
   Every budget timed interleaved in one process; the tokens must equal the one-pass run's.
2. **The greedy pick**: `jnp.argmax` against `processors.greedy_token` over [prompts, 50257]
   random float32 logits, each alone and with the log-sum-exp `generation.choose` computes
   beside it, interleaved.

3. **A decode step's attention**: `model.attend` with one query row (its weighted-sum path)
   against the same softmax with the `einsum` dot for the values, over a float32 cache of
   [prompts, 12 heads, S slots, 64] (S = 145, 192: workload 3's caches), interleaved.

Prints a markdown summary and writes the figures as JSON (machine and CPU flags included).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import add_study_options, log, machine, time_interleaved, today, write_study
from bench.models import checkpoint, load_ours
from bench.report import _sp, _table, _x


def prefill_rates(path: Path, budgets: list[int | None], prompts: int, repeats: int
                  ) -> list[dict[str, Any]]:
    """Seconds of prefill + first token per pass budget, interleaved in one process."""
    from bench.generation import prompts as make_prompts
    from gpt2model import Generator, SamplingConfig, get_tokenizer
    from gpt2model.batching import pass_rows, plan_prefill
    from gpt2model.generation import record_seed

    config, params = load_ours(path)
    tokenizer = get_tokenizer(str(path))
    ids, mask = make_prompts(prompts, config.vocab_size, prompts)
    seeds = np.stack([record_seed(0, i) for i in range(prompts)])
    settings = SamplingConfig(max_new_tokens=1, temperature=0.0)
    gens = {budget: Generator(config, params, tokenizer, prefill_tokens=budget)
            for budget in budgets}
    timed = time_interleaved(
        {str(b): lambda g=g: g.decode_batch(ids, mask, seeds, settings)[0]
         for b, g in gens.items()}, repeats)
    plan = plan_prefill(ids, mask, tokenizer.eos_token_id)
    rows, length = plan.ids.shape
    one_pass = timed[str(budgets[0])]["warmup_result"]
    out = []
    for budget in budgets:
        t = timed[str(budget)]
        per = pass_rows(rows, length, budget)
        out.append({"budget": budget, "prompts": prompts, "prompt_tokens": int(mask.sum()),
                    "packed_rows": rows, "row_length": length, "rows_per_pass": per,
                    "passes": -(-rows // per), "seconds": t["seconds"],
                    "same_tokens": bool(np.array_equal(t["warmup_result"], one_pass))})
    return out


# Calls per timed sample of the millisecond-scale parts (2 and 3): one call is near the
# timer's noise.
CALLS = 20


def ms_per_call(calls: dict[str, tuple[Any, list[Any]]], repeats: int
                ) -> dict[str, dict[str, float]]:
    """Each (function, args) jitted and timed interleaved, CALLS calls a sample -> ms per call
    spread by name."""
    import jax

    def sample(fn: Any, args: list[Any]) -> None:
        for _ in range(CALLS):
            jax.block_until_ready(fn(*args))

    fns = {name: functools.partial(sample, jax.jit(fn), args)
           for name, (fn, args) in calls.items()}
    timed = time_interleaved(fns, repeats)
    return {name: {k: timed[name]["seconds"][k] * 1000 / CALLS for k in ("median", "min", "max")}
            for name in fns}


def pick_times(rows: int, vocab: int, repeats: int) -> list[dict[str, Any]]:
    """Milliseconds of argmax vs greedy_token, alone and beside a log-sum-exp."""
    import jax
    import jax.numpy as jnp

    from gpt2model.processors import greedy_token

    logits = jax.device_put(np.random.default_rng(0).normal(size=(rows, vocab))
                            .astype(np.float32))
    forms = {
        "argmax": lambda x: jnp.argmax(x, axis=-1),
        "greedy_token": greedy_token,
        "argmax + logsumexp": lambda x: (jnp.argmax(x, axis=-1), jax.nn.logsumexp(x, axis=-1)),
        "greedy_token + logsumexp": lambda x: (greedy_token(x), jax.nn.logsumexp(x, axis=-1)),
    }
    ms = ms_per_call({name: (form, [logits]) for name, form in forms.items()}, repeats)
    same = np.array_equal(np.asarray(jax.jit(greedy_token)(logits)),
                          np.asarray(jnp.argmax(logits, axis=-1)))
    return [{"form": name, "rows": rows, "vocab": vocab, "same_tokens": bool(same),
             "ms": ms[name]} for name in forms]


def attention_times(rows: int, slots: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """Milliseconds per layer of a decode step's attention, weighted sum vs einsum values."""
    import jax
    import jax.numpy as jnp

    from gpt2model.model import attend

    def einsum_values(q, k, v, mask):
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k) * 0.125
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = jnp.sum(weights, axis=-1, keepdims=True)
        return jnp.einsum("bhts,bhsd->bhtd", weights, v) / total

    forms = {"weighted sum (shipped)": lambda q, k, v, m: attend(q, k, v, m, 0.125, jnp.float32),
             "einsum values": einsum_values}
    rng = np.random.default_rng(0)
    calls, args = {}, {}
    for s in slots:
        q = rng.normal(size=(rows, 12, 1, 64)).astype(np.float32)
        k, v = (rng.normal(size=(rows, 12, s, 64)).astype(np.float32) for _ in range(2))
        args[s] = [jax.device_put(a) for a in (q, k, v, np.ones((rows, 1, s), bool))]
        for name, form in forms.items():
            calls[f"{name} @ {s}"] = (form, args[s])
    ms = ms_per_call(calls, repeats)
    out = []
    for s in slots:
        a = args[s]
        diff = float(np.abs(np.asarray(jax.jit(forms["einsum values"])(*a))
                            - np.asarray(jax.jit(forms["weighted sum (shipped)"])(*a))).max())
        for name in forms:
            out.append({"form": name, "rows": rows, "slots": s, "max_abs_difference": diff,
                        "ms": ms[f"{name} @ {s}"]})
    return out


def markdown(res: dict[str, Any]) -> str:
    base = res["prefill"][0]["seconds"]["median"]
    yes = {True: "yes", False: "NO"}
    lines = [f"Prefill pass study, {res['machine']['slug']}, {res['date']} "
             f"(`{res['command']}`)", ""]
    lines += _table(
        ["prefill_tokens", "packed rows x length", "rows a pass", "passes",
         "prefill + 1st token s", "vs one pass", "same tokens"],
        [[str(r["budget"] or "one pass"), f"{r['packed_rows']}x{r['row_length']}",
          str(r["rows_per_pass"]), str(r["passes"]), _sp(r["seconds"], 2),
          _x(base / r["seconds"]["median"]), yes[r["same_tokens"]]] for r in res["prefill"]])
    lines += _table(["greedy pick over [rows, vocab]", "ms", "same tokens"],
                    [[f"{r['form']} [{r['rows']}, {r['vocab']}]", _sp(r["ms"], 2),
                      yes[r["same_tokens"]]] for r in res["pick"]])
    lines += _table(["decode attention, one layer", "ms", "max abs difference"],
                    [[f"{r['form']} [{r['rows']}, 12, {r['slots']}, 64]", _sp(r["ms"], 2),
                      f"{r['max_abs_difference']:.1e}"] for r in res["attention"]])
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="none,1024,2048,4096",
                   help="prefill_tokens values, 'none' = one pass (the first is the baseline)")
    p.add_argument("--prompts", type=int, default=64)
    add_study_options(p)
    args = p.parse_args(argv)
    path = checkpoint("gpt2", Path(args.cache_dir))
    budgets = [None if b.lower() == "none" else int(b) for b in args.budgets.split(",") if b]
    log(f"prefill study: budgets {budgets}, {args.prompts} prompts")
    given = argv if argv is not None else __import__("sys").argv[1:]
    res = {"machine": machine(), "date": today(),
           "command": " ".join(["python -m bench.prefill_study", *given]),
           "prefill": prefill_rates(path, budgets, args.prompts, args.repeats),
           "pick": pick_times(args.prompts, 50257, args.repeats),
           "attention": attention_times(args.prompts, (145, 192), args.repeats)}
    write_study(res, args.out, "prefill", markdown(res))


if __name__ == "__main__":
    main()
