"""Study: the token budget of a CPU scoring batch (`CPU_SCORE_BATCH_TOKENS` in pipeline/config.py).

    python -m bench.batch_study [--budgets 1024,2048,4096,8192] [--repeats 3] [--docs 200]
        [--job-budgets 2048,8192] [--out bench/results/studies]

1. **The model step per budget**: gpt2 random weights, the jitted `Scorer` on full batches of
   rows of 128 and of 1024 tokens (rows = budget // length), float32 and bfloat16, every budget
   of one dtype timed interleaved in one process; tokens/s per shape.
2. **The score job per budget**: `pipeline.jobs.run` on the synthetic pipeline corpus
   (workload 2's, `--docs` documents) in a fresh process per run (`bench.job ours`), budgets
   alternating; tokens/s end to end and the padding efficiency the packer reached.
3. **The packer's pool** (`MIN_OPEN_ROWS` in gpt2model/batching.py): `RowPacker` run over the
   same corpus's windows (no model) at batches of 2 and 8 rows of 1024 with several pool
   sizes; the fill (tokens / row capacity) it reaches. An empty `--budgets` and
   `--job-budgets` leave only this part.

Prints a markdown summary and writes the figures as JSON (machine and CPU flags included).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    add_study_options,
    log,
    machine,
    spread,
    time_interleaved,
    today,
    write_study,
)
from bench.models import checkpoint, load_ours, scorer

LENGTHS = (128, 1024)
DTYPES = ("float32", "bfloat16")


def step_rates(path: Path, budgets: list[int], repeats: int) -> list[dict[str, Any]]:
    """Tokens/s of the scoring step per (dtype, length, budget), interleaved per dtype."""
    import jax

    config, params = load_ours(path)
    out = []
    for dtype in DTYPES:
        score = scorer(config, params, dtype)
        fns, shapes = {}, {}
        rng = np.random.default_rng(0)
        for length in LENGTHS:
            for budget in budgets:
                rows = max(1, budget // length)
                seq = rng.integers(0, config.vocab_size, (rows, length + 1), dtype=np.int32)
                args = [jax.device_put(a) for a in (seq[:, :-1].copy(), seq[:, 1:].copy(),
                                                     np.ones((rows, length), np.int32))]
                name = f"{rows}x{length}"
                fns[name] = lambda a=args, s=score: jax.block_until_ready(s(*a))
                shapes[name] = (budget, rows, length)
        log(f"step {dtype}: {', '.join(fns)}")
        timed = time_interleaved(fns, repeats)
        for name, (budget, rows, length) in shapes.items():
            sec = timed[name]["seconds"]
            out.append({"dtype": dtype, "budget": budget, "rows": rows, "length": length,
                        "seconds": sec, "tokens_per_s": rows * length / sec["median"]})
    return out


def job_rates(path: Path, budgets: list[int], repeats: int, docs: int) -> list[dict[str, Any]]:
    """The score job on the synthetic corpus at each budget, fresh processes, alternating."""
    from bench import corpus
    from bench.endtoend import run_job
    from gpt2model import get_tokenizer

    with tempfile.TemporaryDirectory(prefix="batch-study-") as tmp:  # corpus and outputs
        work = Path(tmp)
        info = corpus.write(work / "corpus.jsonl", docs, get_tokenizer(str(path)), 1024)
        runs: dict[int, list[dict[str, Any]]] = {b: [] for b in budgets}
        # One untimed run first: it fills the compilation cache, as a user's earlier run would.
        run_job("ours", info["path"], path, "float32", work / "warm", budgets[0])
        for i in range(repeats):
            for budget in budgets:
                log(f"job budget {budget}, run {i + 1}/{repeats}")
                runs[budget].append(run_job("ours", info["path"], path, "float32",
                                            work / f"out-{budget}", budget))
    out = []
    for budget, rs in runs.items():
        out.append({"budget": budget, "docs": docs, "tokens": info["tokens"],
                    "tokens_per_s": spread([r["tokens"] / r["seconds"] for r in rs]),
                    "padding_efficiency": rs[0]["tokens"] / rs[0]["padded_tokens"],
                    "batches": rs[0]["batches"], "compiles": [r["compiles"] for r in rs]})
    return out


POOLS = ((2, 4), (2, 8), (2, 16), (2, 32), (8, 16))  # (rows a batch, open rows)


def packing_fill(path: Path, docs: int) -> list[dict[str, Any]]:
    """Fill of RowPacker's rows over the corpus's windows, per (rows, pool size)."""
    from bench import corpus
    from gpt2model import get_tokenizer
    from gpt2model.batching import RowPacker
    from gpt2model.scoring import text_windows

    tokenizer = get_tokenizer(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        info = corpus.write(Path(tmp) / "corpus.jsonl", docs, tokenizer, 1024)
    sizes = []
    for n in info["token_counts"]:
        for w in text_windows(list(range(n)), window=1024, bos_token_id=tokenizer.eos_token_id):
            sizes.append(len(w.input_ids))
    out = []
    for rows, pool in POOLS:
        packer = RowPacker(1024, rows)
        packer.pool = pool  # the size under study, in place of max(2 x rows, MIN_OPEN_ROWS)
        batches = []
        for i, n in enumerate(sizes):
            batches += packer.add(i, n)
        batches += packer.flush()
        capacity = 1024 * sum(len(b) for b in batches)
        out.append({"rows": rows, "pool": pool, "fill": sum(sizes) / capacity,
                    "batches": len(batches), "docs": docs, "windows": len(sizes)})
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Batch budget study, {res['machine']['slug']}, {res['date']} "
             f"(`python -m bench.batch_study`)", "",
             "| dtype | row length | budget | rows | tokens/s | vs the largest budget |",
             "|---|---|---|---|---|---|"]
    for r in res["steps"]:
        top = max((s for s in res["steps"] if s["dtype"] == r["dtype"]
                   and s["length"] == r["length"]), key=lambda s: s["budget"])
        lines.append(f"| {r['dtype']} | {r['length']} | {r['budget']} | {r['rows']} | "
                     f"{r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / top['tokens_per_s']:.2f}x |")
    if res["jobs"]:
        lines += ["", "| score job budget | tokens/s end to end | padding efficiency | batches |",
                  "|---|---|---|---|"]
        for j in res["jobs"]:
            t = j["tokens_per_s"]
            lines.append(f"| {j['budget']} | {t['median']:,.0f} ({t['min']:,.0f}–{t['max']:,.0f})"
                         f" | {j['padding_efficiency']:.3f} | {j['batches']} |")
    lines += ["", "| rows a batch | open rows | fill |", "|---|---|---|"]
    lines += [f"| {r['rows']} | {r['pool']} | {r['fill']:.4f} |" for r in res["packing"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="1024,2048,4096,8192")
    p.add_argument("--job-budgets", default="2048,8192", help="empty: skip the job runs")
    p.add_argument("--docs", type=int, default=200)
    add_study_options(p)
    args = p.parse_args(argv)
    path = checkpoint("gpt2", Path(args.cache_dir))
    budgets = [int(b) for b in args.budgets.split(",") if b]
    job_budgets = [int(b) for b in args.job_budgets.split(",") if b]
    res = {"machine": machine(), "date": today(), "command": "python -m bench.batch_study "
           + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "steps": step_rates(path, budgets, args.repeats) if budgets else [],
           "jobs": job_rates(path, job_budgets, args.repeats, args.docs) if job_budgets else [],
           "packing": packing_fill(path, args.docs)}
    write_study(res, args.out, "batch", markdown(res))


if __name__ == "__main__":
    main()
