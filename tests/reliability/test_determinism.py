"""Determinism across the combinations tests/pipeline/test_jobs.py does not run.

Already there: the same score and sampled-generate jobs twice, score on 2 workers and on 2
devices, sampled generation with two batch budgets. Here the rest: scoring with another batch
budget, texts bucketed one per row instead of packed several per row (so one record's rolling
windows land in other batches, with other padding and neighbours), sampled generation on 2
worker processes, and both jobs on 2 devices with yet other budgets. Scores must agree within
1e-5; samples of the same seed must be identical.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from rel_helpers import REPO, cli_env, sorted_rows

from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.writers import read_output

TIGHT = 1e-5
LONG = " ".join(f"Clause {i} of a text longer than the context, about item {i % 7}."
                for i in range(25))  # about 300 tokens: several rolling windows
TEXTS = ["Hello", "A short sentence.", "naïve café — ünïcödé", LONG, LONG[:400], "x y z " * 30,
         "1 2 3 4 5 6 7 8 9", "\tTabs\nand newlines\r\n", "<|endoftext|> in the middle"]
PROMPTS = ["Once upon a time", "The answer is", "Hi", "naïve", "word " * 20, "A B C"]


def assert_same(a: list[dict], b: list[dict]) -> None:
    """Same rows (sorted): floats within TIGHT, everything else exactly."""
    assert len(a) == len(b)
    for x, y in zip(sorted_rows(a), sorted_rows(b), strict=True):
        assert x.keys() == y.keys()
        for key, u in x.items():
            v = y[key]
            if isinstance(u, float) or (isinstance(u, list) and u and isinstance(u[0], float)):
                # Log-probs within TIGHT; perplexity = exp(-mean) (~5e4 for random weights)
                # relatively.
                tol = dict(rtol=TIGHT, atol=0) if key == "perplexity" else dict(rtol=0,
                                                                                atol=TIGHT)
                np.testing.assert_allclose(np.array(u, float), np.array(v, float), **tol,
                                           err_msg=f"{x['id']} {key}")
            else:
                assert u == v, (x["id"], key)


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_checkpoint) -> dict[str, JobConfig]:
    root = tmp_path_factory.mktemp("determinism")
    (root / "texts.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    # Few bucket shapes (each one is a compile of seconds): the base jobs pad everything to
    # the context (64) or, generating, to 32 + 6.
    score = JobConfig(input=str(root / "texts.jsonl"), output=str(root / "score-base"),
                      model=str(tiny_checkpoint), stride=24, max_tokens_per_batch=512,
                      bucket_boundaries=(64,), progress=False)
    generate = JobConfig(mode="generate", input=str(root / "prompts.jsonl"),
                         output=str(root / "gen-base"), model=str(tiny_checkpoint),
                         max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                         num_samples=2, max_tokens_per_batch=1024, bucket_boundaries=(32,),
                         progress=False)
    return {
        "score": score,
        # One text a row, bucketed by length (8/24/64), 40 tokens a batch: 5, 1 and 1 rows a
        # batch, where the base job packs several texts into each of 8 rows of 64.
        "score-small-batches": score.replace(output=str(root / "score-small"), pack=False,
                                             max_tokens_per_batch=40,
                                             bucket_boundaries=(8, 24)),
        "score-2dev": score.replace(output=str(root / "score-2dev"), max_tokens_per_batch=100),
        "generate": generate,
        "generate-2workers": generate.replace(output=str(root / "gen-2workers")),
        "generate-2dev": generate.replace(output=str(root / "gen-2dev"), max_tokens_per_batch=60),
    }


@pytest.fixture(scope="module")
def base(configs) -> dict[str, tuple[jobs.JobSummary, list[dict]]]:
    out = {}
    for name in ("score", "generate"):
        summary = jobs.run(configs[name])
        out[name] = summary, read_output(configs[name].output)
    return out


def test_score_with_other_batches_and_buckets(configs, base):
    config = configs["score-small-batches"]
    summary = jobs.run(config)
    base_summary, base_rows = base["score"]
    assert summary.batches > base_summary.batches  # it did batch differently
    assert_same(read_output(config.output), base_rows)
    assert (summary.result_records, summary.tokens) == (len(TEXTS), base_summary.tokens)


def test_sampled_generation_on_two_worker_processes(configs, base):
    config = configs["generate-2workers"]
    summary = jobs.run(config, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert summary.output_rows == 2 * len(PROMPTS)
    assert_same(read_output(config.output), base["generate"][1])


_TWO_DEVICES = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    assert jax.device_count() == 2, jax.devices()
    from pipeline import jobs
    from pipeline.config import JobConfig
    for fields in json.loads(sys.argv[1]):
        for key in ("keep_fields", "stop", "bucket_boundaries"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        summary = jobs.run(JobConfig(**fields))
        print("SUMMARY " + json.dumps(dataclasses.asdict(summary)), flush=True)
""")


def test_both_jobs_on_two_devices(configs, base):
    """One subprocess with 2 host devices runs the score and the sampled generate job."""
    todo = [configs["score-2dev"], configs["generate-2dev"]]
    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, json.dumps([dataclasses.asdict(c) for c in todo])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line.removeprefix("SUMMARY "))
                 for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert [s["result_records"] for s in summaries] == [len(TEXTS), len(PROMPTS)]
    assert_same(read_output(todo[0].output), base["score"][1])
    assert_same(read_output(todo[1].output), base["generate"][1])
