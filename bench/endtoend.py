"""Workloads 2 and 4: the whole scoring job, end to end, and how it scales.

Every job runs in a fresh subprocess (`bench.job`), so each repeat pays what a user's run pays
(imports aside: the clock starts when the job is built) and its peak memory is its own: the
parent samples the resident memory of the child's whole process tree every 50 ms, and the
child reports its own high-water mark (VmHWM). The warm-up is one run on a small slice of the
corpus (it warms the page cache and the checkpoint file, not the model: every run compiles
afresh, and the compile time is reported separately, measured by JAX's own compile events).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import corpus
from bench.common import REPO, log, spread, tree_rss_bytes
from bench.job import MARKER
from bench.models import checkpoint, model_config

POLL_S = 0.05


def run_job(impl: str, corpus_path: str, model: Path, dtype: str, out: Path,
            batch_tokens: int, beam_args: tuple[str, ...] = (), repo: Path = REPO,
            env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job in a subprocess; its result dict plus the polled peak tree RSS and the
    process' wall seconds. `repo`: the source tree whose code runs (another revision's)."""
    cmd = [sys.executable, "-m", "bench.job", impl, "--corpus", corpus_path, "--model",
           str(model), "--dtype", dtype, "--out", str(out), "--batch-tokens", str(batch_tokens)]
    cmd += [f"--beam-arg={a}" for a in beam_args]
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            done.wait(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"bench.job {impl} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(MARKER):])
    # The polled tree total covers worker processes; VmHWM catches a peak between two polls.
    result["peak_rss_mb"] = max(peak[0] / 2**20, result.get("vmhwm_mb") or 0.0)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["wall_s"] = wall
    return result


def repeat_job(ctx, impl: str, corpus_path: str, model: Path, dtype: str, tag: str,
               beam_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """`ctx.pipeline_repeats` runs of one job; medians with spreads, every run kept."""
    runs = []
    for r in range(ctx.pipeline_repeats):
        out = ctx.work_dir / f"out-{tag}-{r}"
        runs.append(run_job(impl, corpus_path, model, dtype, out, ctx.pipeline_batch_tokens,
                            beam_args))
        log(f"  {tag} run {r + 1}: {runs[-1]['tokens_per_s']:,.0f} tokens/s, "
            f"{runs[-1]['seconds']:.1f}s, peak RSS {runs[-1]['peak_rss_mb']:,.0f} MB")
    seconds = spread([x["seconds"] for x in runs])
    tokens = runs[0]["tokens"]
    out: dict[str, Any] = {
        "impl": impl, "dtype": dtype, "beam_args": list(beam_args), "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": {"median": tokens / seconds["median"], "min": tokens / seconds["max"],
                         "max": tokens / seconds["min"]},
        "padded_tokens": runs[0]["padded_tokens"],
        "padding_efficiency": tokens / runs[0]["padded_tokens"] if runs[0]["padded_tokens"]
        else None,
        "compiles": runs[0]["compiles"],
        "peak_rss_mb": spread([x["peak_rss_mb"] for x in runs]),
        "runs": runs,
    }
    if all(x.get("model_s") for x in runs):
        # The job's profile: model-step seconds (compiles included for ours) and the rest.
        out["model_s"] = spread([x["model_s"] for x in runs])
        out["model_share"] = out["model_s"]["median"] / seconds["median"]
    compile_s = [x["compile_s"] for x in runs if x.get("compile_s") is not None]
    if compile_s:
        out["compile_s"] = spread(compile_s)
        out["tokens_per_s_ex_compile"] = spread(
            [x["tokens"] / (x["seconds"] - x["compile_s"]) for x in runs
             if x.get("compile_s") is not None])
    if any(x["results"] + x["errors"] != x["records"] for x in runs) or any(
            x["errors"] for x in runs):
        raise AssertionError(f"{impl} job lost or rejected records: {runs}")
    return out


def _setup(ctx, n_docs: int, name: str, seed: int = 0, long_every: int | None = None
           ) -> tuple[Path, dict[str, Any]]:
    from gpt2model import get_tokenizer

    size = ctx.sizes[0]
    model = checkpoint(size, ctx.cache_dir)
    cfg = model_config(size)
    info = corpus.write(ctx.work_dir / f"{name}.jsonl", n_docs, get_tokenizer(model),
                        cfg.n_positions, seed, long_every)
    return model, info


def _warm_up(ctx, model: Path, info: dict[str, Any], impls: tuple[str, ...]) -> None:
    """One untimed run per implementation on the first few documents."""
    head = ctx.work_dir / "warmup.jsonl"
    with open(info["path"], encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
        for _, line in zip(range(4), src, strict=False):
            dst.write(line)
    for impl in impls:
        run_job(impl, str(head), model, ctx.pipeline_dtypes[0], ctx.work_dir / "out-warmup",
                ctx.pipeline_batch_tokens)


def run(ctx, scoring: dict[str, Any] | None = None) -> dict[str, Any]:
    """Workload 2: ours vs the plain transformers loop on one corpus, per dtype."""
    from pipeline.config import JobConfig

    model, info = _setup(ctx, ctx.docs, "corpus")
    counts = info.pop("token_counts")
    context = model_config(ctx.sizes[0]).n_positions
    job = JobConfig(max_tokens_per_batch=ctx.pipeline_batch_tokens)
    buckets = corpus.bucket_shapes(counts, context, job)
    log(f"pipeline: corpus {info['docs']} docs, {info['tokens']} tokens, "
        f"{info['over_context']} over the context, buckets {buckets}")
    if ctx.pipeline_warmup:
        _warm_up(ctx, model, info, ctx.pipeline_impls)
    entries = []
    for dtype in ctx.pipeline_dtypes:
        for impl in ctx.pipeline_impls:
            log(f"pipeline: {impl} {dtype}")
            e = repeat_job(ctx, impl, info["path"], model, dtype, f"{impl}-{dtype}")
            e["bucket_shapes"] = len(buckets) if impl == "ours" else None
            entries.append(e)
    _ratios(entries, scoring, ctx.sizes[0])
    return {"size": ctx.sizes[0], "corpus": info, "buckets": buckets, "entries": entries}


def _ratios(entries: list[dict[str, Any]], scoring: dict[str, Any] | None, size: str) -> None:
    """Ratio to the peer job and to workload 1's aggregate model-step rate at the same dtype."""
    by = {(e["impl"], e["dtype"]): e for e in entries}
    step = {(a["size"], a["dtype"]): a for a in (scoring or {}).get("aggregate", [])}
    for e in entries:
        peer = by.get(("peer", e["dtype"]))
        if e["impl"] == "ours" and peer:
            e["ratio_to_peer"] = e["tokens_per_s"]["median"] / peer["tokens_per_s"]["median"]
        agg = step.get((size, e["dtype"]))
        if agg:
            key = "ours_tokens_per_s" if e["impl"] == "ours" else "peer_tokens_per_s"
            e["model_step_tokens_per_s"] = agg[key]
            e["ratio_to_model_step"] = e["tokens_per_s"]["median"] / agg[key]
            if "tokens_per_s_ex_compile" in e:
                e["ratio_to_model_step_ex_compile"] = (
                    e["tokens_per_s_ex_compile"]["median"] / agg[key])


def run_scaling(ctx) -> dict[str, Any]:
    """Workload 4: ours at corpus sizes 1x, 4x, 16x, and at 1 vs 2 DirectRunner workers."""
    model, base = _setup(ctx, ctx.scale_docs * max(ctx.scales), "scale", seed=7,
                         long_every=ctx.scale_docs)
    base.pop("token_counts")
    lines = Path(base["path"]).read_text(encoding="utf-8").splitlines(keepends=True)
    if ctx.pipeline_warmup:
        _warm_up(ctx, model, base, ("ours",))
    dtype = ctx.pipeline_dtypes[0]
    entries = []
    for scale in ctx.scales:
        path = ctx.work_dir / f"scale-{scale}x.jsonl"
        path.write_text("".join(lines[:ctx.scale_docs * scale]), encoding="utf-8")
        for workers in ctx.workers:
            if workers > 1 and scale != ctx.workers_scale:
                continue
            args = () if workers == 1 else (f"--direct_num_workers={workers}",
                                            "--direct_running_mode=multi_processing")
            log(f"scaling: {scale}x corpus, {workers} worker(s)")
            e = repeat_job(ctx, "ours", str(path), model, dtype, f"scale{scale}-w{workers}",
                           args)
            e.update(scale=scale, workers=workers, docs=ctx.scale_docs * scale)
            e.pop("runs")
            entries.append(e)
    one = [e for e in entries if e["workers"] == 1]
    summary: dict[str, Any] = {}
    if len(one) > 1:
        first, last = one[0], one[-1]
        summary["throughput_ratio_largest_to_smallest"] = (
            last["tokens_per_s"]["median"] / first["tokens_per_s"]["median"])
        summary["rss_ratio_largest_to_smallest"] = (
            last["peak_rss_mb"]["median"] / first["peak_rss_mb"]["median"])
    w = {e["workers"]: e for e in entries if e["scale"] == ctx.workers_scale}
    if 1 in w and len(w) > 1:
        most = max(w)
        summary["workers_speedup"] = (w[most]["tokens_per_s"]["median"]
                                      / w[1]["tokens_per_s"]["median"])
    return {"size": ctx.sizes[0], "dtype": dtype, "entries": entries, "summary": summary}
