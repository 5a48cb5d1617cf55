"""Workload 7: evaluation sets. Multiple choice against lm-evaluation-harness, and the cost of
top-K alternatives and entropy.

Multiple choice: a synthetic set (word-token contexts and 4 choices each, lengths drawn per
record) scored by our job (`score --choices-field`, the context computed once per record) and by
lm-eval's HF backend (`HFLM.loglikelihood` over every (context, choice) pair, its own batching),
same checkpoint and dtype float32, model load included on both sides. Before anything is
reported the two sides' log-likelihoods are compared; a mismatch fails the workload. Tokens
computed: ours = real tokens in our packed rows, naive = every pair's context + choice, as
lm-eval computes them.

Top-K and entropy: the scoring model step on one packed batch, plain and with top_logprobs=5 and
entropy from the same LM-head pass, timed interleaved.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from bench.common import log, rate, time_interleaved
from bench.models import checkpoint, load_ours, scorer, word_ids

CHOICES = 4
AGREE_ATOL = 1e-3  # float32 sums of up to ~12 log-probs on both sides


def _mc_set(tokenizer, records: int, context_tokens: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = word_ids(tokenizer)
    out = []
    for i in range(records):
        n_ctx = int(rng.integers(context_tokens // 2, context_tokens * 3 // 2))
        ctx = tokenizer.decode(rng.choice(words, n_ctx).tolist()).strip() + "\nAnswer:"
        choices = [tokenizer.decode(rng.choice(words, int(rng.integers(3, 13))).tolist()).strip()
                   for _ in range(CHOICES)]
        out.append({"id": f"q{i}", "question": ctx, "choices": choices,
                    "label": int(rng.integers(0, CHOICES))})
    return out


def _ours(ctx, path, data_path) -> tuple[dict[str, Any], dict[str, list[float]]]:
    from pipeline import jobs
    from pipeline.config import JobConfig
    from pipeline.writers import read_output

    out = ctx.work_dir / "evalsets-ours"
    config = JobConfig(input=str(data_path), output=str(out), model=str(path), id_field="id",
                       context_field="question", choices_field="choices",
                       label_field="label", target_delimiter=" ", progress=False,
                       overwrite=True, max_tokens_per_batch=ctx.pipeline_batch_tokens)
    start = time.perf_counter()
    summary = jobs.run(config)
    seconds = time.perf_counter() - start
    rows = {r["id"]: r["choice_logprobs"] for r in read_output(str(out))}
    return {"seconds": seconds, "model_s": summary.model_seconds,
            "tokens_computed": summary.padded_tokens, "tokens_real": summary.input_tokens,
            "compiles": summary.compiles, "accuracy": summary.accuracy}, rows


def _lm_eval(path, docs: list[dict], device: str) -> tuple[dict[str, Any], list[list[float]]]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    lm = HFLM(pretrained=str(path), device=device, batch_size=16)
    loaded = time.perf_counter()
    requests = [Instance("loglikelihood", {}, (d["question"], " " + c), i)
                for d in docs for i, c in enumerate(d["choices"])]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    seconds = time.perf_counter() - start
    naive = sum(len(c) + len(x) - 1 for c, x in (lm._encode_pair(*r.args) for r in requests))
    lls = [ll for ll, _ in results]
    per_doc = [lls[i * CHOICES:(i + 1) * CHOICES] for i in range(len(docs))]
    return {"seconds": seconds, "load_s": loaded - start, "tokens_naive": naive}, per_doc


def _top_k_cost(ctx, config, params) -> dict[str, Any]:
    import jax

    from bench.scoring import make_batch

    length = config.n_positions
    rows = max(1, ctx.batch_tokens // length)
    ids, tgt, mask = make_batch(length, rows, config.vocab_size, seed=11)
    score = scorer(config, params, "float32")
    args = [jax.device_put(a) for a in (ids, tgt, mask)]
    timed = time_interleaved({
        "plain": lambda: jax.block_until_ready(score(*args)),
        "top5_entropy": lambda: jax.block_until_ready(score(*args, top_logprobs=5,
                                                            entropy=True)),
    }, ctx.repeats)
    tokens = rows * length
    out = {"batch": f"{rows}x{length}", "tokens": tokens}
    for name, t in timed.items():
        out[name] = {"seconds": t["seconds"], "tokens_per_s": rate(tokens, t["seconds"])}
    out["ratio"] = (out["top5_entropy"]["tokens_per_s"]["median"]
                    / out["plain"]["tokens_per_s"]["median"])
    return out


def run(ctx) -> dict[str, Any]:
    from gpt2model import get_tokenizer

    size = ctx.sizes[0]
    path = checkpoint(size, ctx.cache_dir)
    tokenizer = get_tokenizer(path)
    records, context_tokens = (6, 16) if ctx.quick else (100, 120)
    docs = _mc_set(tokenizer, records, context_tokens, seed=3)
    data = ctx.work_dir / "evalsets.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    log(f"evalsets: {size} multiple choice, {records} records x {CHOICES} choices")
    ours, our_rows = _ours(ctx, path, data)
    peer, peer_rows = _lm_eval(path, docs, ctx.torch_device)
    worst = max(float(np.max(np.abs(np.subtract(our_rows[d["id"]], p))))
                for d, p in zip(docs, peer_rows, strict=True))
    if worst > AGREE_ATOL:
        raise AssertionError(f"ours and lm-eval disagree on choice log-likelihoods by {worst}")
    mc = {"size": size, "records": records, "choices": CHOICES, "max_abs_diff": worst,
          "ours": ours, "lm_eval": peer,
          "ours_records_per_s": records / ours["seconds"],
          "lm_eval_records_per_s": records / peer["seconds"]}
    mc["ratio"] = mc["ours_records_per_s"] / mc["lm_eval_records_per_s"]
    mc["computed_vs_naive"] = ours["tokens_real"] / peer["tokens_naive"]
    log(f"evalsets: top-K + entropy cost, {size}")
    config, params = load_ours(path)
    return {"multiple_choice": mc, "top_k": {"size": size, **_top_k_cost(ctx, config, params)}}
