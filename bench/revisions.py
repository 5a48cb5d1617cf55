"""Our score job at another git revision against this tree, alternating, in one run.

    python -m bench.revisions --base 6cf546f [--docs 60] [--repeats 3] [--dtype float32]
                              [--corpus synthetic|realtext]

Why: a change that restructures the job (the model step moved behind the Beam ModelHandler,
per-item output for --resume) must not make it slower, and only a comparison in one run on one
machine says so (absolute figures do not travel between machines, or even runs). The base
revision is checked out with `git worktree` into a temporary directory; both trees run the
same `bench.job ours` command on the same corpus (workload 2's kind, or with `--corpus realtext`
workload 12's real prose, `--docs` and `--realtext-tokens` bounding it) and checkpoint, in fresh
processes, base and head alternating, each run with a new empty XDG cache so neither finds the
other's (or an earlier run's) compiled programs. Reported per side: the job's own tokens/s
(scored tokens / the job's seconds) and the whole process' wall seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import corpus, realtext
from bench.common import REPO, log, machine, spread, today, versions
from bench.endtoend import run_job
from bench.models import checkpoint, model_config


def write_corpus(kind: str, path: Path, docs: int, tokenizer, context: int,
                 realtext_tokens: int) -> dict[str, Any]:
    """The compared corpus at `path`: {"path", "docs", "tokens"}."""
    if kind == "synthetic":
        return corpus.write(path, docs, tokenizer, context)
    chosen, _ = realtext.collect(tokenizer, realtext_tokens, docs)
    if not chosen:
        raise RuntimeError("no prose found for a real-text corpus")
    realtext.write_corpus(path, chosen)
    return {"path": str(path), "docs": len(chosen), "tokens": sum(d["tokens"] for d in chosen)}


def compare(base: str, docs: int, repeats: int, dtype: str, size: str, batch_tokens: int,
            work: Path, cache_dir: Path, kind: str = "synthetic",
            realtext_tokens: int = 20_000) -> dict[str, Any]:
    """Alternate `repeats` runs of base and head; medians, spreads and every run."""
    from gpt2model import get_tokenizer

    commit = subprocess.run(["git", "rev-parse", base], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    model = checkpoint(size, cache_dir)
    info = write_corpus(kind, work / "corpus.jsonl", docs, get_tokenizer(model),
                        model_config(size).n_positions, realtext_tokens)
    tree = work / "base-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO,
                   check=True, capture_output=True)
    runs: dict[str, list] = {"base": [], "head": []}
    try:
        for r in range(repeats):
            for side, repo in (("base", tree), ("head", REPO)):
                got = run_job("ours", info["path"], model, dtype, work / f"out-{side}-{r}",
                              batch_tokens, repo=repo,
                              env_extra={"XDG_CACHE_HOME": str(work / f"xdg-{side}-{r}")})
                if got["errors"] or got["results"] != got["records"]:
                    raise AssertionError(f"{side} run had errors: {got}")
                runs[side].append(got)
                log(f"  {side} run {r + 1}: {got['tokens_per_s']:,.0f} tokens/s, job "
                    f"{got['seconds']:.1f}s, process {got['wall_s']:.1f}s")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                       capture_output=True)
    sides = {side: {"tokens_per_s": spread([x["tokens_per_s"] for x in got]),
                    "wall_s": spread([x["wall_s"] for x in got]), "runs": got}
             for side, got in runs.items()}
    if len({x["tokens"] for got in runs.values() for x in got}) != 1:
        raise AssertionError("the two revisions scored different token counts")
    return {"base_revision": base, "base_commit": commit, "dtype": dtype, "size": size,
            "corpus": {"kind": kind, **{k: info[k] for k in ("docs", "tokens")}},
            "batch_tokens": batch_tokens, **sides,
            "ratio_tokens_per_s": sides["head"]["tokens_per_s"]["median"]
            / sides["base"]["tokens_per_s"]["median"],
            "ratio_wall": sides["head"]["wall_s"]["median"] / sides["base"]["wall_s"]["median"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.revisions")
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--docs", type=int, default=60,
                        help="documents (synthetic) or at most this many (realtext; 0: any)")
    parser.add_argument("--corpus", choices=("synthetic", "realtext"), default="synthetic")
    parser.add_argument("--realtext-tokens", type=int, default=20_000,
                        help="token budget of a realtext corpus (workload 12's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens a batch (default: the score job's default on this backend)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "bench" / ".cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.batch_tokens is None:
        from pipeline.config import JobConfig

        args.batch_tokens = JobConfig(mode="score").batch_token_budget()
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        result = compare(args.base, args.docs, args.repeats, args.dtype, args.size,
                         args.batch_tokens, Path(tmp), args.cache_dir, args.corpus,
                         args.realtext_tokens)
    where = machine()
    result.update(machine=where, versions=versions(), date=today())
    suffix = "" if args.corpus == "synthetic" else f"-{args.corpus}"
    path = args.out / "revisions" / f"{where['slug']}-{today()}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    head, base = result["head"], result["base"]
    log(f"head / {result['base_revision']} ({result['base_commit'][:7]}): tokens/s "
        f"{head['tokens_per_s']['median']:,.0f} / {base['tokens_per_s']['median']:,.0f} = "
        f"{result['ratio_tokens_per_s']:.2f}x; process wall {result['ratio_wall']:.2f}x ({path})")


if __name__ == "__main__":
    main()
