"""Workload 12: the scoring pipeline through the Beam ModelHandler against our score job.

The same corpus (the pipeline workload's) and dtype: `bench.job ours` (our job: packing,
bucketing, per-item output) and `bench.job handler` (a user's pipeline: ReadFromText ->
RunInference(GPT2ScoringModelHandler) -> WriteToParquet, Beam's own batching), each in its own
process (our job's repeats, then the handler's). Both reach the model through the same
model-step code.
"""

from __future__ import annotations

from typing import Any

from bench.common import log
from bench.endtoend import _setup, repeat_job


def run(ctx) -> dict[str, Any]:
    dtype = ctx.pipeline_dtypes[0]
    model, info = _setup(ctx, ctx.docs, "handler-corpus")
    log(f"RunInference handler vs our job: {info['docs']} documents, {dtype}")
    entries = {impl: repeat_job(ctx, impl, info["path"], model, dtype, f"handler-{impl}")
               for impl in ("ours", "handler")}
    ratio = (entries["handler"]["tokens_per_s"]["median"]
             / entries["ours"]["tokens_per_s"]["median"])
    return {"corpus": {k: info[k] for k in ("docs", "tokens")}, "dtype": dtype,
            "ours": entries["ours"], "handler": entries["handler"], "ratio": ratio}
