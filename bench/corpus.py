"""A synthetic scoring corpus with a realistic length mix, as JSONL.

Token lengths are log-normal (median 120, sigma 1.1), clipped to 20..3000; one document in every
`long_every` (the first one of each block) is forced past the model's context so rolling windows
always run, and every prefix of whole blocks has the same mix (what the scaling workload
needs). Text is word salad: random vocabulary tokens of the form " word", which re-tokenize one
to one, so the lengths hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import word_ids

MEDIAN, SIGMA, SHORTEST, LONGEST = 120, 1.1, 20, 3000


def lengths(n_docs: int, context: int, seed: int, long_every: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.exp(rng.normal(np.log(MEDIAN), SIGMA, n_docs)).round().astype(np.int64)
    out = np.clip(out, SHORTEST, LONGEST)
    long = min(LONGEST, int(context * 1.6))
    out[::long_every or max(n_docs, 1)] = np.maximum(out[::long_every or max(n_docs, 1)], long)
    return out


def write(path: Path, n_docs: int, tokenizer, context: int, seed: int = 0,
          long_every: int | None = None) -> dict[str, Any]:
    """Write `n_docs` records {"id", "text"} to `path`; return their real token counts."""
    rng = np.random.default_rng(seed + 1)
    words = word_ids(tokenizer)
    texts = [tokenizer.decode(rng.choice(words, n).tolist())
             for n in lengths(n_docs, context, seed, long_every)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"doc-{i:06d}", "text": text}) + "\n")
    counts = [len(ids) for ids in tokenizer.encode_batch(texts)]
    return stats(counts, context) | {"path": str(path), "token_counts": counts}


def stats(counts: list[int], context: int) -> dict[str, Any]:
    arr = np.asarray(counts)
    return {"docs": len(counts), "tokens": int(arr.sum()), "min": int(arr.min()),
            "median": float(np.median(arr)), "max": int(arr.max()),
            "over_context": int((arr + 1 > context).sum())}


def bucket_shapes(counts: list[int], context: int, job_config) -> list[int]:
    """The padded lengths the pipeline's windows of this corpus fall into: the compile bound."""
    from gpt2model.scoring import text_windows
    from pipeline.transforms import bucket_lengths

    buckets = bucket_lengths(job_config, context)
    used = set()
    for n in counts:
        # Token-window lengths depend only on the token count; the ids themselves do not matter.
        for w in text_windows(range(n), window=context, stride=job_config.stride,
                              bos_token_id=0 if job_config.add_bos else None):
            used.add(next(b for b in buckets if len(w.input_ids) <= b))
    return sorted(used)
