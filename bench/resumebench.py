"""Workload 10: `--resume` after a kill costs the work left, not the whole job again.

The pipeline corpus is cut into 16 JSONL shards (16 work items). One uninterrupted score job
(`gpt2-pipeline score`, its own process) sets the baseline; then, for each kill point, a fresh
job is SIGKILLed once 4, 8 or 12 of its items are complete, and the same command with
`--resume` is timed. A straight line t = fixed + per_token * tokens_left is fitted through
the resumed runs and the full one: `fixed` is what every start pays (process, model load,
compile), and the residuals say how well time follows the work left. An untimed full run
first, so every timed run finds the same programs in the compilation cache; a run with error
rows, or a resumed output whose token count differs from the full one's, fails the workload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, log
from bench.endtoend import _setup

SHARDS = 16
KILL_AFTER = (4, 8, 12)  # complete items
# The score job's packer keeps up to max(2 x rows, 8) rows open (gpt2model.batching.RowPacker):
# at 8192 tokens a batch that is 16 rows of 1024, more than the whole 14k-token corpus of 60
# documents, so items would only complete at the end. Small batches let items complete as the
# job goes, as they do on a corpus much larger than the packer's pool; even so the 8 rows
# (8k tokens) of 2-row batches are over half of 60 documents (items then complete in bursts
# and a kill point can be overrun): run this workload on 120 documents or more.
RESUME_BATCH_TOKENS = 2048


def _shards(path: str, out: Path) -> str:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // SHARDS)
    for s in range(SHARDS):
        if lines[s * per:(s + 1) * per]:  # no empty shard: its blank line is a read error
            (out / f"shard-{s}.jsonl").write_text(
                "\n".join(lines[s * per:(s + 1) * per]) + "\n", encoding="utf-8")
    return str(out / "*.jsonl")


def _command(pattern: str, model: Path, output: Path, dtype: str, batch_tokens: int,
             *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "score", "--input", pattern, "--output",
            str(output), "--model", str(model), "--dtype", dtype, "--max-tokens-per-batch",
            str(batch_tokens), "--no-progress", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _timed(cmd: list[str], output: Path) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"score job failed: {proc.stderr.strip().splitlines()[-3:]}")
    marker = json.loads((output / "_SUCCESS").read_text())
    if marker["error_records"] or marker["result_records"] != marker["input_records"]:
        # A fast run of failed records is no measurement (and the resumed output must equal
        # the uninterrupted one).
        raise RuntimeError(f"score job had errors: {marker['error_records']} of "
                           f"{marker['input_records']} records")
    return {"wall_s": wall, "records": marker["input_records"],
            "reused_records": marker["reused_records"], "tokens": marker["tokens"],
            "reused_tokens": marker["reused_tokens"]}


def _kill_after(cmd: list[str], output: Path, items: int) -> int:
    """Run `cmd`, SIGKILL it once `items` work items are complete; -> items complete then."""
    done = output / "_resume" / "items"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if len(list(done.glob("*.json"))) >= items:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    if (output / "_SUCCESS").exists():
        return -1  # finished first: best-fit packing can hold items open to the very end
    return len(list(done.glob("*.json")))


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def run(ctx) -> dict[str, Any]:
    dtype = ctx.pipeline_dtypes[0]
    model, info = _setup(ctx, ctx.docs, "resume-corpus")
    pattern = _shards(info["path"], ctx.work_dir / "resume-shards")
    shards = len(list((ctx.work_dir / "resume-shards").glob("*.jsonl")))
    batch = min(ctx.pipeline_batch_tokens, RESUME_BATCH_TOKENS)
    log(f"resume: {info['docs']} documents in {shards} shards, {dtype}, {batch} tokens a batch")
    full_out = ctx.work_dir / "resume-full"
    full_cmd = _command(pattern, model, full_out, dtype, batch, "--overwrite")
    _timed(full_cmd, full_out)  # warm-up: every timed run then finds the same compiled programs
    full = _timed(full_cmd, full_out)
    log(f"  uninterrupted: {full['wall_s']:.1f}s for {full['records']} records")
    runs = []
    for items in KILL_AFTER:
        out = ctx.work_dir / f"resume-{items}"
        cmd = _command(pattern, model, out, dtype, batch)
        complete = _kill_after(cmd, out, items)
        if complete < 0:
            log(f"  the job finished before {items} items were complete: no kill point")
            runs.append({"killed_with_items_complete": None, "kill_target": items})
            continue
        resumed = _timed(cmd + ["--resume"], out)
        if resumed["tokens"] != full["tokens"]:
            raise AssertionError(f"resumed output has {resumed['tokens']} tokens, the "
                                 f"uninterrupted one {full['tokens']}")
        left = resumed["records"] - resumed["reused_records"]
        runs.append({"killed_with_items_complete": complete, "records_left": left,
                     "tokens_left": resumed["tokens"] - resumed["reused_tokens"], **resumed})
        log(f"  killed at {complete}/{shards} items: resume {resumed['wall_s']:.1f}s for "
            f"{left} records, {runs[-1]['tokens_left']} tokens left")
    killed = [r for r in runs if r["killed_with_items_complete"] is not None]
    result = {"corpus": {k: info[k] for k in ("docs", "tokens")}, "shards": shards,
              "batch_tokens": batch,
              "dtype": dtype, "full": full, "resumed": killed, "missed": [
                  r["kill_target"] for r in runs if r not in killed]}
    if len(killed) < 2:
        return result
    # Work left is tokens (records differ in length by 100x); the full run has all of them.
    points = [(full["tokens"], full["wall_s"])] + [(r["tokens_left"], r["wall_s"])
                                                   for r in killed]
    fixed, per_token = _fit(points)
    for r in killed:
        r["predicted_s"] = fixed + per_token * r["tokens_left"]
        r["residual"] = r["wall_s"] / r["predicted_s"] - 1
        # The share of the uninterrupted run's work time (past the fixed cost) it took.
        r["work_share"] = (r["wall_s"] - fixed) / (full["wall_s"] - fixed)
        r["left_share"] = r["tokens_left"] / full["tokens"]
    return {**result, "fixed_s": fixed, "seconds_per_token": per_token,
            "max_abs_residual": max(abs(r["residual"]) for r in killed)}
