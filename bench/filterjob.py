"""Workload 8: the filter job against the score job on the same corpus and dtype, and its
memory as the corpus grows.

Both jobs run in their own process on the pipeline corpus (`bench.endtoend`'s), alternating
run by run; the filter uses quantile buckets (two passes through files), the costliest rule.
Then the filter runs on the 1x and 16x scaling corpora: peak RSS of the whole process tree.
"""

from __future__ import annotations

from typing import Any

from bench.common import log
from bench.endtoend import _setup, repeat_job


def run(ctx) -> dict[str, Any]:
    dtype = ctx.pipeline_dtypes[0]
    model, info = _setup(ctx, ctx.docs, "filter-corpus")
    log(f"filter vs score: {info['docs']} documents, {dtype}")
    entries = {}
    for impl in ("ours", "filter"):
        entries[impl] = repeat_job(ctx, impl, info["path"], model, dtype, f"filter-{impl}")
    ratio = (entries["filter"]["tokens_per_s"]["median"]
             / entries["ours"]["tokens_per_s"]["median"])
    scales = []
    for scale in (1, 16):
        m, s_info = _setup(ctx, ctx.scale_docs * scale, f"filter-scale-{scale}", seed=5)
        log(f"filter memory: {scale}x corpus, {s_info['docs']} documents")
        e = repeat_job(ctx, "filter", s_info["path"], m, dtype, f"filter-scale{scale}")
        scales.append({"scale": scale, "docs": s_info["docs"], "tokens": s_info["tokens"],
                       "peak_rss_mb": e["peak_rss_mb"], "tokens_per_s": e["tokens_per_s"]})
    rss = scales[-1]["peak_rss_mb"]["median"] / scales[0]["peak_rss_mb"]["median"]
    return {"corpus": {k: info[k] for k in ("docs", "tokens")}, "dtype": dtype,
            "score": entries["ours"], "filter": entries["filter"], "ratio": ratio,
            "scales": scales, "rss_ratio_16x_to_1x": rss}
