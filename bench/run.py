"""The benchmark command: every workload of issue 4, ours against transformers, in one run.

    python -m bench.run [--quick]
                        [--workloads roofline,scoring,pipeline,generation,scaling,profile,
                                     evalsets,filter,report,resume,kernels,realtext]
                        [--sizes gpt2,gpt2-medium] [--dtypes float32,bfloat16] [--out DIR]

Writes `<out>/<machine>-<date>.json` (a later run on the same machine and day replaces the
workloads it ran and keeps the others) and regenerates the tables of BENCHMARKS.md. `--quick`
is a smoke run of every code path on a toy model (2 layers, width 64, the real vocabulary); it
writes `<machine>-<date>-quick.json` and `BENCHMARKS.md` inside `--out` (default
bench/results/quick), never the top-level file. Runs unchanged on a CUDA machine: JAX uses its
default backend, transformers runs on "cuda" when torch sees a GPU, and the batch sizes grow
to fill the card.
"""

from __future__ import annotations

import os

# Before JAX is imported: on a GPU, JAX must not grab 75% of the card, PyTorch shares it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import DTYPES, REPO, log, machine, today, torch_device, versions  # noqa: E402

WORKLOADS = ("roofline", "scoring", "pipeline", "generation", "scaling", "profile",
             "evalsets", "filter", "report", "resume", "kernels", "realtext", "startup",
             "handler", "genextras")  # order
SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


@dataclasses.dataclass
class Context:
    """Settings every workload reads (see `settings` for the defaults per mode and device)."""

    quick: bool
    sizes: list[str]
    dtypes: list[str]
    repeats: int
    cache_dir: Path
    work_dir: Path
    torch_device: str
    lengths: tuple[int, ...] = (128, 512, 1024)
    batch_tokens: int = 0  # workload 1: rows = batch_tokens // length; 0 = the job's budget
    matmul_n: int = 4096
    matmul_calls: int = 2
    docs: int = 200
    pipeline_batch_tokens: int = 0  # JobConfig.max_tokens_per_batch, and the peer's budget;
    # 0 = the score job's default on this backend (JobConfig.batch_token_budget)
    pipeline_dtypes: tuple[str, ...] = DTYPES
    pipeline_impls: tuple[str, ...] = ("ours", "peer")
    pipeline_repeats: int = 3
    pipeline_warmup: bool = True
    scale_docs: int = 16
    scales: tuple[int, ...] = (1, 4, 16)
    workers: tuple[int, ...] = (1, 2)
    workers_scale: int = 4
    prompt_counts: tuple[int, ...] = (16, 64)
    prompt_lengths: tuple[int, int] = (32, 128)
    new_tokens: int = 64
    kernel_rows: int = 8  # workload 11: the scoring step's batch, rows x length tokens
    kernel_length: int = 1024
    kernel_configs: tuple[str, ...] = ("default", "onednn", "onednn-dot", "eigen")  # XLA_FLAGS
    kernel_repeats: int = 5  # samples per matmul cell (the step itself takes `repeats`)
    kernel_step_rows: int = 2  # rows of the whole-step check (x kernel_length tokens)
    realtext_tokens: int = 20000  # workload 12: the real-text corpus's token budget
    realtext_docs: int = 0  # and its document cap (0: none)

    gen_dtypes: tuple[str, ...] = DTYPES

    @property
    def gen_sizes(self) -> list[str]:
        return self.sizes


def settings(args: argparse.Namespace, cache_dir: Path, work_dir: Path) -> Context:
    from bench.common import on_accelerator

    dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(dtypes) <= set(DTYPES):
        raise SystemExit(f"--dtypes must be among {', '.join(DTYPES)}")
    sizes = [s for s in args.sizes.split(",") if s]
    if not args.quick and not set(sizes) <= set(SIZES):
        raise SystemExit(f"--sizes must be among {', '.join(SIZES)}")
    ctx = Context(quick=args.quick, sizes=sizes, dtypes=dtypes, repeats=args.repeats,
                  cache_dir=cache_dir, work_dir=work_dir, torch_device=torch_device())
    # The model step is timed at the batches the score job runs by default here, so workload 1
    # is the step the pipeline runs (on CPU 2048 tokens: faster per token than larger steps).
    from pipeline.config import JobConfig

    ctx.batch_tokens = ctx.pipeline_batch_tokens = JobConfig(mode="score").batch_token_budget()
    if on_accelerator():
        ctx.batch_tokens, ctx.pipeline_batch_tokens = 32768, 32768
        ctx.matmul_n, ctx.matmul_calls = 8192, 20
    if args.quick:
        # Every code path once, as cheaply as possible: a toy model, one pipeline dtype,
        # single pipeline runs without warm-up, one prompt batch, few new tokens.
        ctx.sizes = ["tiny"]
        ctx.lengths, ctx.batch_tokens = (64,), 256
        ctx.matmul_n, ctx.matmul_calls = 256, 2
        ctx.docs, ctx.pipeline_batch_tokens = 8, 1024
        ctx.pipeline_dtypes, ctx.pipeline_repeats, ctx.pipeline_warmup = (dtypes[0],), 1, False
        ctx.scale_docs, ctx.scales, ctx.workers, ctx.workers_scale = 3, (1, 2), (1, 2), 1
        # One new token: the full decode and the time-to-first-token call then share a compile.
        ctx.prompt_counts, ctx.new_tokens, ctx.gen_dtypes = (16,), 1, (dtypes[-1],)
        ctx.prompt_lengths = (8, 32)
        ctx.kernel_rows, ctx.kernel_length, ctx.kernel_configs = 2, 256, ("default", "onednn")
        ctx.kernel_repeats, ctx.kernel_step_rows = 2, 1
        ctx.realtext_tokens, ctx.realtext_docs = 1500, 6
    else:
        ctx.pipeline_dtypes = ctx.gen_dtypes = tuple(dtypes)
    if args.docs:
        ctx.docs = args.docs
    if args.scale_docs:
        ctx.scale_docs = args.scale_docs
    if args.batch_tokens:
        ctx.batch_tokens = args.batch_tokens
    if args.pipeline_repeats:
        ctx.pipeline_repeats = args.pipeline_repeats
    if args.realtext_tokens:
        ctx.realtext_tokens = args.realtext_tokens
    return ctx


def run_workload(name: str, ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    from bench import (
        endtoend,
        evalsets,
        filterjob,
        generation,
        genextras,
        handlerbench,
        kernels,
        profile,
        realtext,
        reportbench,
        resumebench,
        roofline,
        scoring,
        startup,
    )

    done = results["workloads"]
    if name == "roofline":
        return roofline.run(ctx)
    if name == "scoring":
        return scoring.run(ctx)
    if name == "pipeline":
        return endtoend.run(ctx, done.get("scoring"))
    if name == "generation":
        return generation.run(ctx)
    if name == "profile":
        return profile.run(ctx)
    if name == "evalsets":
        return evalsets.run(ctx)
    if name == "filter":
        return filterjob.run(ctx)
    if name == "report":
        return reportbench.run(ctx)
    if name == "resume":
        return resumebench.run(ctx)
    if name == "kernels":
        return kernels.run(ctx)
    if name == "realtext":
        return realtext.run(ctx)
    if name == "startup":
        return startup.run(ctx)
    if name == "handler":
        return handlerbench.run(ctx)
    if name == "genextras":
        return genextras.run(ctx)
    return endtoend.run_scaling(ctx)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on a toy model")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma list among {','.join(WORKLOADS)}")
    p.add_argument("--sizes", default="gpt2", help="comma list of GPT-2 presets (first = "
                   "the one the pipeline, scaling and targets use)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed repeats per figure (default and minimum 3; 2 in --quick)")
    p.add_argument("--pipeline-repeats", type=int, default=0,
                   help="timed runs per pipeline job (default 3; 1 in --quick)")
    p.add_argument("--docs", type=int, default=0, help="documents in the pipeline corpus")
    p.add_argument("--scale-docs", type=int, default=0, help="documents in the 1x scaling corpus")
    p.add_argument("--realtext-tokens", type=int, default=0,
                   help="token budget of the real-text corpus (default 20000; 1500 in --quick)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="workload 1 tokens per batch (default: the score job's budget here, "
                   "2048 on CPU; 32768 on GPU)")
    p.add_argument("--out", default=None, help="results directory (default bench/results, "
                   "bench/results/quick with --quick)")
    p.add_argument("--markdown", default=None, help="BENCHMARKS.md to regenerate (default "
                   "the top-level one; <out>/BENCHMARKS.md with --quick)")
    p.add_argument("--cache-dir", default=None, help="where random checkpoints are kept "
                   "(default bench/.cache; <out>/cache with --quick)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if not args.quick and (args.repeats < 3 or 0 < args.pipeline_repeats < 3):
        p.error("--repeats and --pipeline-repeats must be >= 3 (medians of >= 3 timed repeats)")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench import report, roofline

    args = parse(argv)
    out = Path(args.out or REPO / "bench" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    markdown = Path(args.markdown) if args.markdown else (
        out / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")
    cache = Path(args.cache_dir) if args.cache_dir else (
        out / "cache" if args.quick else REPO / "bench" / ".cache")
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    info = machine()
    date = today()
    path = out / f"{info['slug']}-{date}{'-quick' if args.quick else ''}.json"
    results: dict[str, Any] = {"workloads": {}, "commands": []}
    if path.exists():
        results = json.loads(path.read_text(encoding="utf-8"))
    wanted = [w for w in WORKLOADS if w in args.workloads.split(",")]
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-") as work:
        ctx = settings(args, cache, Path(work))
        results.update(machine=info, date=date, quick=args.quick, versions=versions(),
                       settings=_jsonable(ctx))
        results["commands"] = [*[c for c in results.get("commands", []) if c != command],
                               command]
        log(f"{info['slug']}: {', '.join(wanted)}; sizes {ctx.sizes}, dtypes {ctx.dtypes}")
        for name in wanted:
            start = time.perf_counter()
            try:
                data = run_workload(name, ctx, results)
            except Exception as err:  # one broken workload must not lose the others' numbers
                traceback.print_exc()
                data = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
                failed.append(name)
            data["wall_s"] = time.perf_counter() - start
            data["command"] = command
            results["workloads"][name] = data
            log(f"{name} done in {data['wall_s']:.0f}s")
    roofline.annotate(results)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report.update_markdown(markdown, report.newest_per_machine(out, args.quick))
    log(f"wrote {path} and {markdown}")
    print(path)
    if failed:
        log(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def _jsonable(ctx: Context) -> dict[str, Any]:
    d = dataclasses.asdict(ctx)
    for key in ("cache_dir", "work_dir"):
        d.pop(key)
    return d


if __name__ == "__main__":
    sys.exit(main())
