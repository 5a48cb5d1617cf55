"""Smoke run of the benchmark harness: `python -m bench.run --quick` on a toy model.

Checks that every workload ran and produced numbers, and that the BENCHMARKS.md-style tables
were written into the output directory (never the top-level BENCHMARKS.md). Benchmarks
themselves are not tests: nothing here judges speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("roofline", "scoring", "pipeline", "generation", "scaling", "profile", "evalsets",
             "filter", "report", "kernels", "realtext", "resume", "startup", "handler",
             "genextras")


def _positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


def test_quick_run_covers_every_workload(tmp_path):
    top = REPO / "BENCHMARKS.md"
    before = top.read_bytes() if top.exists() else None
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    files = list(out.glob("*-quick.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    assert res["quick"] is True
    assert {"machine", "date", "versions", "settings", "commands"} <= set(res)
    assert isinstance(res["machine"]["cpu_flags"], list)
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):  # the kernel-relevant ones
        if flag in res["machine"]["cpu_flags"]:
            assert flag.replace("_", "") in res["machine"]["slug"], res["machine"]["slug"]
    for name in WORKLOADS:
        assert name in res["workloads"], name
        assert "error" not in res["workloads"][name], res["workloads"][name]
    w = res["workloads"]

    for e in w["scoring"]["entries"]:
        for side in ("ours", "peer"):
            assert _positive(e[side]["tokens_per_s"]["median"])
            assert _positive(e[side]["mfu"])
            assert e[side]["seconds"]["n"] >= 2
        assert e["check"]["max_abs_diff"] < 1e-2
    assert {a["dtype"] for a in w["scoring"]["aggregate"]} == {"float32", "bfloat16"}

    impls = {e["impl"] for e in w["pipeline"]["entries"]}
    assert impls == {"ours", "peer"}
    for e in w["pipeline"]["entries"]:
        assert _positive(e["tokens_per_s"]["median"])
        assert _positive(e["peak_rss_mb"]["median"])
        assert 0 < e["padding_efficiency"] <= 1
        assert _positive(e["ratio_to_model_step"])
    ours = next(e for e in w["pipeline"]["entries"] if e["impl"] == "ours")
    assert ours["compiles"] >= 1 and ours["bucket_shapes"] >= 1
    assert _positive(ours["compile_s"]["median"])
    assert w["pipeline"]["corpus"]["over_context"] >= 1  # rolling windows ran

    modes = {e["mode"] for e in w["generation"]["entries"]}
    assert modes == {"greedy", "top_p"}
    for e in w["generation"]["entries"]:
        for side in ("ours", "peer"):
            assert _positive(e[side]["tokens_per_s"]["median"])
            assert _positive(e[side]["ttft_s"]["median"])

    scaling = w["scaling"]
    assert {e["workers"] for e in scaling["entries"]} == {1, 2}
    assert len({e["scale"] for e in scaling["entries"]}) >= 2
    assert _positive(scaling["summary"]["throughput_ratio_largest_to_smallest"])
    assert _positive(scaling["summary"]["workers_speedup"])

    for dtype in ("float32", "bfloat16"):
        assert _positive(w["roofline"]["jax"][dtype]["flops"]["median"])

    kinds = {(e["kind"], e["dtype"]) for e in w["profile"]["entries"]}
    assert {("scoring", "float32"), ("scoring", "bfloat16")} <= kinds
    assert any(kind == "generation" for kind, _ in kinds)
    for e in w["profile"]["entries"]:
        parts = ("step", "transformer", "matmuls", "attention", "head_logsoftmax") \
            if e["kind"] == "scoring" else ("prefill_and_first_token", "matmuls",
                                             "attention_over_cache", "head_argmax")
        assert all(_positive(e["ms"][k]) for k in parts), e["ms"]

    mc = w["evalsets"]["multiple_choice"]
    assert mc["max_abs_diff"] <= 1e-3
    assert 0 < mc["ours"]["tokens_real"] < mc["lm_eval"]["tokens_naive"]
    assert _positive(mc["ours_records_per_s"]) and _positive(mc["lm_eval_records_per_s"])
    assert _positive(w["evalsets"]["top_k"]["ratio"])

    fj = w["filter"]
    assert _positive(fj["ratio"]) and _positive(fj["rss_ratio_16x_to_1x"])
    assert [e["scale"] for e in fj["scales"]] == [1, 16]

    assert _positive(w["report"]["seconds"]) and w["report"]["rows"] == 20_000

    kern = w["kernels"]
    matmuls = {e["matmul"] for e in kern["entries"]}
    assert matmuls == {"c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj", "attn_scores",
                       "attn_values", "lm_head"}
    assert set(kern["configs"]) >= {"default", "onednn"}
    for e in kern["entries"]:
        for name, c in e["by_config"].items():
            assert _positive(c["gflops"]["median"]), (e["matmul"], e["form"], name)
            assert c["kernel"] and c["kernel"] != "no dot", c
            assert c["rel_err"] < (2e-2 if "bf16" in e["form"] else 1e-4), (e, name)
    forms = {e["form"] for e in kern["entries"]}
    assert {"f32", "bf16>f32", "bf16", "f32 [E,V]"} <= forms
    assert all(_positive(v) for s in kern["summary"]["step_matmul_s"].values()
               for v in s.values())
    assert {s["dtype"] for s in kern["steps"]} == {"float32", "bfloat16"}
    for s in kern["steps"]:
        assert all(_positive(c["tokens_per_s"]["median"]) for c in s["by_config"].values())

    rt = w["realtext"]
    assert rt["corpus"]["docs"] >= 2 and _positive(rt["corpus"]["tokens"])
    assert {e["impl"] for e in rt["entries"]} == {"ours", "peer", "peer-rolling"}
    assert rt["corpus"]["over_context"] >= 1  # rolling windows differ from the plain loop's
    assert 0 <= rt["rolling_max_abs_difference"] <= 2e-3  # the same numbers as ours
    for e in rt["entries"]:
        assert _positive(e["tokens_per_s"]["median"])
        assert e["tokens"] == rt["corpus"]["tokens"] == e["runs"][0]["tokens"]
        assert e["computed_per_scored"] >= 1
    ours_rt = next(e for e in rt["entries"] if e["impl"] == "ours")
    assert _positive(ours_rt["ratio_to_peer"]) and _positive(ours_rt["ratio_to_peer_rolling"])
    assert rt["synthetic"]["computed_per_scored"] >= 1
    assert _positive(rt["synthetic"]["tokens"])

    md = (out / "BENCHMARKS.md").read_text()
    for heading in ("#### Targets", "#### 1. Scoring, model step", "#### 2. Scoring, whole",
                    "#### 3. Generation", "#### 4. Scaling", "#### 5. Roofline",
                    "#### 6. Profile", "#### 7. Evaluation sets", "#### 8. Filter job",
                    "#### 9. Report page", "#### 11. Kernel study", "#### 12. Scoring real"):
        assert heading in md, heading
    assert "| target | measured | needed | status |" in md
    assert (top.read_bytes() if top.exists() else None) == before
