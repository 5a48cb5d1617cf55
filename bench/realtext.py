"""Workload 12: the scoring pipeline on real English prose, ours against the transformers loop.

The corpus is built offline from what the Python environment ships: license texts
(`*.dist-info/LICENSE*`, `COPYING*`, `NOTICE*`, `AUTHORS*`, `licenses/`), packages' long
descriptions (the README body of each `*.dist-info/METADATA`) and README files inside packages.
Each text is one document ({"id": its path under site-packages, "text": ...}), deduplicated by
content (whitespace-normalized), kept if it reads as prose (at least MIN_WORDS words, mostly
letters); documents are taken in a seeded shuffle until a token budget is reached (a document
that would overflow the budget is skipped), so lengths are whatever real documents have (from
a few dozen tokens to several contexts).

Ours (`bench.job ours`) and the plain transformers loop (`bench.job peer`) then run on it
exactly as workload 2 runs them (a fresh subprocess per run, load and compile included),
interleaved: repeat r runs every dtype, ours then peer then `peer-rolling`, the same loop
computing what ours computes (lm-evaluation-harness's rolling windows: a document's last
window is a full context, most of it context only; the plain loop's last window holds only
the tokens left, scored without that context). The target compares ours with the plain loop;
the rolling loop says how much of the gap is the windows. Its float32 per-token log-probs
must agree with ours (max abs difference <= 2e-3, as workload 1 asks) before any figure is
reported. Beside it, our computed/scored token
ratio (padded tokens / scored tokens) on a synthetic corpus of workload 2's kind with about
the same token count, from one run of ours in the same invocation.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Any

from bench import corpus
from bench.common import log, spread
from bench.endtoend import run_job
from bench.models import checkpoint, model_config

LICENSE_NAMES = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.I)
MIN_WORDS = 50
MIN_LETTER_SHARE = 0.6  # letters and spaces over all characters: prose, not tables or code
SEED = 0
MAX_FLOAT32_DIFFERENCE = 2e-3  # workload 1's float32 agreement bound


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _metadata_body(text: str) -> str:
    """The long description of a METADATA file: everything after the header block."""
    _, sep, body = text.partition("\n\n")
    return body if sep else ""


def _candidates(root: Path) -> list[tuple[str, str, str]]:
    """(source kind, path under root, text) of every license, README and long description."""
    out = []
    paths = set(root.glob("*.dist-info/**/*")) | set(root.rglob("[Rr][Ee][Aa][Dd][Mm][Ee]*"))
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.suffix in (".py", ".pyc", ".so", ".json"):
            continue
        parts = rel.split("/")
        in_dist = parts[0].endswith(".dist-info")
        if in_dist and parts[-1] == "METADATA":
            kind = "readme (METADATA)"
        elif in_dist and (LICENSE_NAMES.match(parts[-1]) or "licenses" in parts[1:-1]):
            kind = "license"
        elif not in_dist and parts[-1].upper().startswith("README"):
            kind = "readme (package)"
        else:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if kind == "readme (METADATA)":
            text = _metadata_body(text)
        out.append((kind, rel, text.strip()))
    return out


def _is_prose(text: str) -> bool:
    if len(text.split()) < MIN_WORDS:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters / len(text) >= MIN_LETTER_SHARE


def collect(tokenizer, max_tokens: int, max_docs: int = 0, root: Path | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Documents {"id", "text", "kind", "tokens"} in a seeded shuffle of the deduplicated prose
    texts, until `max_tokens` (and at most `max_docs` documents when > 0); plus counts."""
    root = root or _site_packages()
    found = _candidates(root)
    seen: set[str] = set()
    docs, duplicates, not_prose = [], 0, 0
    for kind, rel, text in found:
        key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if not _is_prose(text):
            not_prose += 1
            continue
        docs.append({"id": rel, "text": text, "kind": kind})
    random.Random(SEED).shuffle(docs)
    counts = [len(ids) for ids in tokenizer.encode_batch([d["text"] for d in docs])]
    chosen, total, over = [], 0, 0
    for d, n in zip(docs, counts, strict=True):
        if max_tokens - total < MIN_WORDS or (max_docs and len(chosen) >= max_docs):
            break
        if total + n > max_tokens:  # one 100k-token text must not become the whole corpus
            over += 1
            continue
        chosen.append({**d, "tokens": n})
        total += n
    kinds: dict[str, int] = {}
    for d in chosen:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    return chosen, {"root": str(root), "files_found": len(found), "duplicates": duplicates,
                    "not_prose": not_prose, "prose_docs": len(docs),
                    "prose_tokens": int(sum(counts)), "skipped_over_budget": over,
                    "by_kind": kinds}


def write_corpus(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")


def synthetic_docs(tokens: int, context: int) -> int:
    """How many of workload 2's synthetic documents (seed 0) add up to about `tokens`."""
    n = 1
    while n < 100_000:
        total = int(corpus.lengths(n, context, seed=0).sum())
        if total >= tokens:
            return n
        n = max(n + 1, int(n * tokens / max(total, 1)))
    return n


def summarize(impl: str, dtype: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians with spreads of one (impl, dtype)'s runs, the fields workload 2 reports."""
    if any(x["errors"] or x["results"] != x["records"] for x in runs):
        raise AssertionError(f"{impl} job lost or rejected records: {runs}")
    seconds = spread([x["seconds"] for x in runs])
    tokens, padded = runs[0]["tokens"], runs[0]["padded_tokens"]
    out: dict[str, Any] = {
        "impl": impl, "dtype": dtype, "tokens": tokens, "padded_tokens": padded,
        "computed_per_scored": padded / tokens if tokens else None,
        "seconds": seconds,
        "tokens_per_s": {"median": tokens / seconds["median"], "min": tokens / seconds["max"],
                         "max": tokens / seconds["min"]},
        "peak_rss_mb": spread([x["peak_rss_mb"] for x in runs]),
        "compiles": runs[0]["compiles"], "runs": runs,
    }
    if all(x.get("model_s") for x in runs):
        out["model_s"] = spread([x["model_s"] for x in runs])
    compile_s = [x["compile_s"] for x in runs if x.get("compile_s") is not None]
    if compile_s:
        out["compile_s"] = spread(compile_s)
        out["tokens_per_s_ex_compile"] = spread([x["tokens"] / (x["seconds"] - x["compile_s"])
                                                 for x in runs])
    return out


def run(ctx) -> dict[str, Any]:
    from gpt2model import get_tokenizer

    size = ctx.sizes[0]
    model = checkpoint(size, ctx.cache_dir)
    tokenizer = get_tokenizer(model)
    context = model_config(size).n_positions
    docs, found = collect(tokenizer, ctx.realtext_tokens, ctx.realtext_docs)
    if not docs:
        raise RuntimeError(f"no prose found under {found['root']}")
    real = ctx.work_dir / "realtext.jsonl"
    write_corpus(real, docs)
    info = corpus.stats([d["tokens"] for d in docs], context) | found | {
        "path": str(real), "ids": [d["id"] for d in docs]}
    synth_path = ctx.work_dir / "realtext-synthetic.jsonl"
    synth = corpus.write(synth_path, synthetic_docs(info["tokens"], context), tokenizer, context)
    synth.pop("token_counts")
    log(f"realtext: {info['docs']} docs, {info['tokens']:,} tokens (median {info['median']:.0f}, "
        f"max {info['max']}, {info['over_context']} over the context); synthetic twin "
        f"{synth['docs']} docs, {synth['tokens']:,} tokens")
    if ctx.pipeline_warmup:
        head = ctx.work_dir / "realtext-warmup.jsonl"
        write_corpus(head, docs[:2])
        for impl in ctx.pipeline_impls:
            run_job(impl, str(head), model, ctx.pipeline_dtypes[0],
                    ctx.work_dir / "out-realtext-warmup", ctx.pipeline_batch_tokens)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    impls = (*ctx.pipeline_impls, *(("peer-rolling",) if "peer" in ctx.pipeline_impls else ()))
    for r in range(ctx.pipeline_repeats):
        for dtype in ctx.pipeline_dtypes:
            for impl in impls:
                res = run_job(impl, str(real), model, dtype,
                              ctx.work_dir / f"out-realtext-{impl}-{dtype}-{r}",
                              ctx.pipeline_batch_tokens)
                runs.setdefault((impl, dtype), []).append(res)
                log(f"  realtext {impl} {dtype} run {r + 1}: {res['tokens_per_s']:,.0f} "
                    f"tokens/s, {res['seconds']:.1f}s, computed/scored "
                    f"{res['padded_tokens'] / res['tokens']:.3f}")
    entries = [summarize(impl, dtype, rs) for (impl, dtype), rs in runs.items()]
    by = {(e["impl"], e["dtype"]): e for e in entries}
    for e in entries:
        for peer_impl, key in (("peer", "ratio_to_peer"),
                               ("peer-rolling", "ratio_to_peer_rolling")):
            peer = by.get((peer_impl, e["dtype"]))
            if e["impl"] == "ours" and peer:
                e[key] = e["tokens_per_s"]["median"] / peer["tokens_per_s"]["median"]
    agreement = None
    if ("peer-rolling", "float32") in runs and ("ours", "float32") in runs:
        agreement = max_logprob_difference(
            ctx.work_dir / "out-realtext-ours-float32-0",
            ctx.work_dir / "out-realtext-peer-rolling-float32-0")
        log(f"realtext: ours vs the rolling loop, float32, max abs difference "
            f"{agreement:.1e}")
        if not agreement <= MAX_FLOAT32_DIFFERENCE:
            raise AssertionError(f"ours and the rolling transformers loop disagree by "
                                 f"{agreement} (> {MAX_FLOAT32_DIFFERENCE})")
    dtype = ctx.pipeline_dtypes[0]
    log(f"realtext: ours {dtype} on the synthetic twin (computed/scored ratio)")
    s = run_job("ours", str(synth_path), model, dtype, ctx.work_dir / "out-realtext-synth",
                ctx.pipeline_batch_tokens)
    synthetic = {**synth, "dtype": dtype, "tokens_scored": s["tokens"],
                 "padded_tokens": s["padded_tokens"],
                 "computed_per_scored": s["padded_tokens"] / s["tokens"],
                 "tokens_per_s": s["tokens_per_s"], "seconds": s["seconds"]}
    return {"size": size, "corpus": info, "synthetic": synthetic, "entries": entries,
            "rolling_max_abs_difference": agreement}


def max_logprob_difference(ours: Path, peer: Path) -> float:
    """Largest |difference| of per-token log-probs between our job's Parquet output and the
    peer's, matched by corpus line (ours: the "<file>:<line>" id it gives records without an
    id field; the peer: its rows, written in corpus order); every document must be in both
    with the same token count."""
    import numpy as np
    import pyarrow.parquet as pq

    def rows(where: Path, by_line: bool) -> dict[int, np.ndarray]:
        got = {}
        for f in sorted(where.rglob("*.parquet")):
            t = pq.read_table(f, columns=["id", "token_logprobs"]).to_pydict()
            for i, v in zip(t["id"], t["token_logprobs"], strict=True):
                line = int(i.rsplit(":", 1)[1]) if by_line else len(got)
                got[line] = np.asarray(v, np.float64)
        return got

    a, b = rows(ours, by_line=True), rows(peer, by_line=False)
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        raise AssertionError("the two jobs wrote different documents or token counts")
    return max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a)
