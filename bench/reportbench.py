"""Workload 9: `gpt2-pipeline report` over a large score output (1,000,000 rows; --quick 20,000).

The output is generated (not scored: the point is the report's reading and drawing), in the
score job's own schema and layout (4 Parquet shards of 64k-row groups, per-token lists of 16
tokens, `_SUCCESS` naming the bench checkpoint for its tokenizer). The report runs in its own
process: wall time and peak RSS (VmHWM) are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.common import REPO, log
from bench.models import checkpoint

TOKENS_PER_ROW = 16
SHARDS = 4

_CHILD = """
import json, sys, time
from pipeline.report import build_report
start = time.perf_counter()
out = build_report(sys.argv[1])
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm, "bytes": out.stat().st_size}))
"""


def write_output(directory, rows: int, model: str, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.modes.score import schema

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-rows // SHARDS)
    fields = schema(type("C", (), {"context_field": None, "top_logprobs": None,
                                   "entropy": False, "summary_only": False,
                                   "keep_fields": ()})())
    for s in range(SHARDS):
        n = min(per, rows - s * per)
        k = TOKENS_PER_ROW
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        mean = rng.normal(-4.0, 0.8, n)
        lp = rng.normal(np.repeat(mean, k), 1.5).astype(np.float32)
        table = pa.table({
            "id": pa.array([f"doc-{s}-{i}" for i in range(n)]),
            "num_tokens": pa.array(np.full(n, k, np.int32)),
            "token_ids": pa.ListArray.from_arrays(offsets, pa.array(
                rng.integers(200, 50000, n * k).astype(np.int32))),
            "token_logprobs": pa.ListArray.from_arrays(offsets, pa.array(lp)),
            "sum_logprob": pa.array(mean * k),
            "mean_logprob": pa.array(mean),
            "perplexity": pa.array(np.exp(-mean)),
            "bits_per_byte": pa.array(-mean * k / (np.log(2) * 5.0 * k)),
            "greedy": pa.ListArray.from_arrays(offsets, pa.array(rng.random(n * k) < 0.3)),
        }, schema=fields)
        pq.write_table(table, directory / f"part-{s:05d}-of-{SHARDS:05d}.parquet",
                       row_group_size=65536)
    summary = {"input_records": rows, "result_records": rows, "output_rows": rows,
               "error_records": 0, "tokens": rows * TOKENS_PER_ROW, "seconds": 1.0,
               "job": {"mode": "score", "model": model, "dtype": "float32"}}
    (directory / "_SUCCESS").write_text(json.dumps(summary))


def run(ctx) -> dict[str, Any]:
    rows = 20_000 if ctx.quick else 1_000_000
    out = ctx.work_dir / "report-output"
    model = checkpoint(ctx.sizes[0], ctx.cache_dir)
    start = time.perf_counter()
    write_output(out, rows, str(model))
    log(f"report: {rows:,}-row score output written in {time.perf_counter() - start:.0f}s")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"report: {result['seconds']:.1f}s, peak RSS {result['peak_rss_mb']:,.0f} MB, "
        f"page {result['bytes'] / 1e6:.2f} MB")
    return {"rows": rows, **result}
