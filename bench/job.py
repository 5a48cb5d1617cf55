"""One scoring job in its own process, so its peak memory is its own (run by bench.pipeline).

    python -m bench.job ours --corpus C.jsonl --model DIR --dtype float32 --out DIR
        [--batch-tokens N] [--beam-arg=--direct_num_workers=2 ...]
    python -m bench.job peer --corpus C.jsonl --model DIR --dtype float32 --out DIR
        [--batch-tokens N]
    python -m bench.job filter ... (same arguments as ours)
    python -m bench.job handler ... (same arguments as ours)

`ours` is `pipeline.jobs.run` on Beam's DirectRunner (JSONL in, Parquet out); `filter` is the
filter job on the same corpus (quantile buckets head/middle/tail at 0.3, 0.7: two passes).
`handler` is a user's pipeline around RunInference(GPT2ScoringModelHandler).
`peer` is the plain transformers loop a user would write: tokenize, cut documents longer than
the context into windows, sort by length, batch under a token budget, pad, forward,
log_softmax + gather, write Parquet. Its windows are disjoint: a document's last window holds
only its remaining tokens, scored without the context before them. `peer-rolling` is the same
loop with lm-evaluation-harness's rolling windows, the numbers our job writes: a later window
is the context's worth of tokens ending at its last target, only its new targets kept.
The last stdout line is `BENCH_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

MARKER = "BENCH_RESULT "


def _peak_rss_mb() -> float | None:
    """This process's own high-water RSS (VmHWM).

    Not ru_maxrss: across fork + exec Linux carries the parent's high-water mark into the
    child's ru_maxrss, so a job started by the (large) harness would report the harness's size.
    VmHWM belongs to the address space exec created, so it is the job's alone.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_ours(args) -> dict[str, Any]:
    import jax.monitoring

    from gpt2model.aot import LOAD_EVENT
    from pipeline.config import JobConfig
    from pipeline.jobs import run

    compile_s = {"trace": 0.0, "lower": 0.0, "compile": 0.0, "load": 0.0}
    names = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile",
             LOAD_EVENT: "load"}  # an executable read from disk instead (gpt2model.aot)

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event in names:
            compile_s[names[event]] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    if args.impl == "filter":  # the filter job on the same corpus: quantile buckets, 2 passes
        config = JobConfig(mode="filter", input=args.corpus, output=args.out, model=args.model,
                           input_format="jsonl", overwrite=True, dtype=args.dtype,
                           max_tokens_per_batch=args.batch_tokens, progress=False,
                           quantiles=(0.3, 0.7), bucket_names=("head", "middle", "tail"))
    else:
        config = JobConfig(mode="score", input=args.corpus, output=args.out, model=args.model,
                           input_format="jsonl", output_format="parquet", overwrite=True,
                           dtype=args.dtype, max_tokens_per_batch=args.batch_tokens,
                           progress=False)
    summary = run(config, list(args.beam_arg))
    in_process = not any("direct_num_workers" in a and not a.endswith("=1")
                         for a in args.beam_arg)
    return {"seconds": summary.seconds, "tokens": summary.tokens,
            "padded_tokens": summary.padded_tokens, "compiles": summary.compiles,
            "batches": summary.batches, "records": summary.input_records,
            "results": summary.result_records, "errors": summary.error_records,
            "model_s": summary.model_seconds, "model_load_s": summary.model_load_seconds,
            # Compilation happens in worker processes when there are several: not seen here.
            "compile_s": sum(compile_s.values()) if in_process else None,
            "compile_parts_s": compile_s if in_process else None}


def run_peer(args) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from bench.common import torch_device, torch_dtype, torch_setup, torch_sync

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch_device()
    torch_setup(device)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = GPT2LMHeadModel.from_pretrained(args.model, attn_implementation="sdpa")
    model = model.to(torch_dtype(args.dtype)).to(device).eval()
    ctx = model.config.n_positions
    eos = tok.eos_token_id
    with open(args.corpus, encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    encoded = tok([d["text"] for d in docs])["input_ids"]
    # Windows of at most ctx inputs; each later window's targets start where the last one's
    # end. Disjoint: its inputs start there too. Rolling: its inputs are the ctx tokens before
    # its last target, the first `keep` of them context only.
    windows = []  # (doc index, offset, input ids + last target, keep)
    for i, ids in enumerate(encoded):
        seq = [eos, *ids]
        for off in range(0, len(seq) - 1, ctx):
            first = max(0, min(off + ctx, len(seq) - 1) - ctx) if args.impl == "peer-rolling" \
                else off
            windows.append((i, off, seq[first:off + ctx + 1], off - first))
    windows.sort(key=lambda w: len(w[2]), reverse=True)
    scores = [np.zeros(len(ids), np.float32) for ids in encoded]
    real = padded = 0
    model_s = 0.0
    k = 0
    with torch.inference_mode():
        while k < len(windows):
            width = len(windows[k][2]) - 1
            rows = max(1, args.batch_tokens // width)
            batch = windows[k:k + rows]
            k += len(batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            tgt = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(batch):
                n = len(seq) - 1
                ids[r, :n] = torch.tensor(seq[:-1])
                tgt[r, :n] = torch.tensor(seq[1:])
                mask[r, :n] = 1
            t0 = time.perf_counter()
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.to(device)[..., None])
            lp = lp[..., 0].cpu().numpy()
            torch_sync(device)
            model_s += time.perf_counter() - t0
            for r, (doc, off, seq, keep) in enumerate(batch):
                n = len(seq) - 1
                scores[doc][off:off + n - keep] = lp[r, keep:n]
                real += n - keep
            padded += len(batch) * width
    table = pa.table({
        "id": [d["id"] for d in docs],
        "num_tokens": pa.array([len(ids) for ids in encoded], pa.int32()),
        "token_logprobs": [s.tolist() for s in scores],
        "sum_logprob": [float(s.sum(dtype=np.float64)) for s in scores],
    })
    os.makedirs(args.out, exist_ok=True)
    pq.write_table(table, os.path.join(args.out, "part-00000.parquet"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": real, "padded_tokens": padded,
            "batches": None, "records": len(docs), "results": len(docs), "errors": 0,
            "model_s": model_s, "compiles": None, "compile_s": None}


def run_handler(args) -> dict[str, Any]:
    """A user's pipeline: RunInference(GPT2ScoringModelHandler) over the corpus' texts, the
    rows written to Parquet: our model step reached through the Beam ModelHandler."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import GPT2ScoringModelHandler
    from pipeline.metrics import counter

    tokens, records = counter("handler_tokens"), counter("handler_records")

    def row(result):
        r = result.inference
        tokens.inc(r.num_tokens or 0)
        records.inc()
        return {"num_tokens": r.num_tokens, "sum_logprob": r.sum_logprob,
                "token_logprobs": r.token_logprobs}

    schema = pa.schema([("num_tokens", pa.int32()), ("sum_logprob", pa.float64()),
                        ("token_logprobs", pa.list_(pa.float32()))])
    start = time.perf_counter()
    handler = GPT2ScoringModelHandler(args.model, dtype=args.dtype,
                                      max_tokens_per_batch=args.batch_tokens)
    pipeline = beam.Pipeline(options=PipelineOptions(list(args.beam_arg)))
    (pipeline
     | beam.io.ReadFromText(args.corpus)
     | beam.Map(lambda line: json.loads(line)["text"])
     | RunInference(handler)
     | beam.Map(row)
     | beam.io.WriteToParquet(os.path.join(args.out, "part"), schema,
                              file_name_suffix=".parquet"))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    got = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    n = got.get("handler_records", 0)
    return {"seconds": seconds, "tokens": got.get("handler_tokens", 0), "padded_tokens": 0,
            "batches": None, "records": n, "results": n, "errors": 0, "model_s": None,
            "compiles": None, "compile_s": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.job")
    parser.add_argument("impl", choices=("ours", "peer", "peer-rolling", "filter", "handler"))
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--beam-arg", action="append", default=[])
    args = parser.parse_args(argv)
    run = {"peer": run_peer, "peer-rolling": run_peer,
           "handler": run_handler}.get(args.impl, run_ours)
    result = run(args)
    result["vmhwm_mb"] = _peak_rss_mb()
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
