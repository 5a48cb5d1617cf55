"""BENCHMARKS.md sections and targets of workloads 11 (kernel study) and 12 (real text).

Kept apart from bench/report.py, which renders workloads 1-10 and the page around them.
"""

from __future__ import annotations

from typing import Any

from bench.report import _n, _sp, _table, _target, _x

KERNEL_FORMS_NOTE = (
    "Forms: `f32` float32; `bf16>f32` bf16 operands, float32 result "
    "(`preferred_element_type`, what gpt2model/model.py asks for); `bf16` bf16 in and out; "
    "activations enter in float32 and are cast in the call, as in the step; the others are "
    "float32 layouts. Kernel: the backend holding each dot in the optimized HLO and the dot's "
    "operand types (`*`: converted from that type inside the same fusion); `+N cvt` / "
    "`+N copy`: separate convert / transpose passes.")


def targets(w: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target on these workloads: real text, ours >= 1.5x the transformers loop."""
    out = []
    for e in w.get("realtext", {}).get("entries", []):
        r = e.get("ratio_to_peer")
        if e["impl"] == "ours" and r is not None:
            out.append(_target(f"real text {e['dtype']} ours vs transformers loop (load and "
                               "compile included)", r, ">= 1.5x", r >= 1.5, _x(r)))
    return out


def kernels(w: dict[str, Any]) -> list[str]:
    spec, names = w["spec"], list(w["configs"])
    settings = "; ".join(f"`{n}` = `{f or '(no flags)'}`" for n, f in w["configs"].items())
    n = w["entries"][0]["by_config"][names[0]]["seconds"]["n"] if w["entries"] else 0
    lines = [f"Each matmul of one {w['size']} scoring step of {spec['rows']}x{spec['length']} "
             f"tokens at its own shape; GFLOP/s per call, median (min–max) of {n} samples, the "
             "XLA settings (one worker process each) timed interleaved. Settings: "
             f"{settings}.", "", KERNEL_FORMS_NOTE, ""]
    rows, last = [], None
    for e in w["entries"]:
        cfgs = e["by_config"]
        programs: dict[str, list[str]] = {}  # identical compiled programs share one group
        for name in names:
            programs.setdefault(cfgs[name].get("program", name), []).append(name)
        kernel = "; ".join(f"{cfgs[v[0]]['kernel']} ({', '.join(v)})"
                           for v in programs.values())
        first = e["matmul"] != last
        last = e["matmul"]
        same = e["form"] != "f32" and all(c.get("same_program_as_f32") for c in cfgs.values())
        rows.append([f"{e['matmul']} {e['shape']}" if first else "",
                     e["form"] + (" (= f32 program)" if same else ""),
                     *[_sp(cfgs[name]["gflops"], 1) for name in names],
                     f"{max(c['rel_err'] for c in cfgs.values()):.0e}", kernel])
    lines += ["Settings in one parenthesis compiled this form to the identical program (their "
              "difference is the noise); `(= f32 program)`: the form compiles to the `f32` "
              "form's program under every setting.", ""]
    lines += _table(["matmul", "form", *[f"{name} GFLOP/s" for name in names],
                     "max rel. err vs float64", "kernel (settings)"], rows)
    if w.get("steps"):
        st = w["steps"][0]
        lines += [f"The whole scoring step (`Scorer`, {st['rows']}x{st['length']} tokens, "
                  "random ids) under each setting, interleaved: tokens/s, median (min–max), "
                  f"and against `{names[0]}`.", ""]
        lines += _table(["step", *[f"{name} tokens/s" for name in names],
                         *[f"{name} vs {names[0]}" for name in names[1:]]],
                        [[e["dtype"], *[_sp(e["by_config"][n]["tokens_per_s"]) for n in names],
                          *[_x(e["by_config"][n]["vs_first"]) for n in names[1:]]]
                         for e in w["steps"]])
    s = w["summary"]
    tokens = spec["rows"] * spec["length"]
    forms = list(next(iter(s["step_matmul_s"].values()), {}))
    lines += [f"All matmuls of one step ({spec['n_layer']} layers' six, "
              f"{-(-tokens // spec['chunk'])} head chunks): seconds from the medians, and the "
              "tokens/s bound if nothing else took time.", ""]
    lines += _table(["setting", *[f"{f} s (tokens/s)" for f in forms]],
                    [[name, *[f"{s['step_matmul_s'][name][f]:.2f} "
                              f"({_n(tokens / s['step_matmul_s'][name][f])})" for f in forms]]
                     for name in names])
    lines += ["Fastest float32 cell per matmul (the largest of many noisy medians, so biased "
              "upward), and the noise: the largest ratio between medians of one identical "
              "program measured in several cells (settings or forms that compiled alike).", ""]
    lines += _table(["matmul", "fastest float32 form", "setting", "GFLOP/s",
                     f"vs `f32` under `{names[0]}`", "same-program spread"],
                    [[mm, b["form"], b["config"], _n(b["gflops"], 1), _x(b["vs_current"]),
                      _x(b.get("same_program_spread"))]
                     for mm, b in s["best_f32"].items()])
    return lines


def realtext(w: dict[str, Any]) -> list[str]:
    c, s = w["corpus"], w["synthetic"]
    kinds = ", ".join(f"{v} {k}" for k, v in c["by_kind"].items())
    lines = [f"Corpus: {c['docs']} documents of real prose from the environment's "
             f"site-packages ({kinds}), {c['tokens']:,} tokens (min {c['min']}, median "
             f"{c['median']:.0f}, max {c['max']}), {c['over_context']} longer than the context. "
             f"Of {c['files_found']} texts found, {c['duplicates']} were duplicates and "
             f"{c['not_prose']} not prose; {c['prose_docs']} prose documents "
             f"({c['prose_tokens']:,} tokens) were shuffled (seeded) and taken up to the token "
             f"budget ({c['skipped_over_budget']} skipped as too long for what was left).", ""]
    rows = []
    names = {"ours": "ours (Beam job)", "peer": "transformers loop",
             "peer-rolling": "transformers loop, rolling windows"}
    rolling = any(e["impl"] == "peer-rolling" for e in w["entries"])
    for e in w["entries"]:
        rows.append([names.get(e["impl"], e["impl"]), e["dtype"], _sp(e["tokens_per_s"]),
                     _sp(e.get("tokens_per_s_ex_compile")), _sp(e.get("compile_s"), 1),
                     _x(e.get("ratio_to_peer"))]
                    + ([_x(e.get("ratio_to_peer_rolling"))] if rolling else [])
                    + [_n(e["computed_per_scored"], 3), _sp(e["peak_rss_mb"])])
    lines += _table(["job", "dtype", "tokens/s end to end", "tokens/s ex compile",
                     "compile s", "vs transformers loop"]
                    + (["vs rolling loop"] if rolling else [])
                    + ["computed / scored tokens", "peak RSS MB"], rows)
    if rolling:
        diff = w.get("rolling_max_abs_difference")
        lines += ["The rolling loop writes the log-probs ours writes (lm-evaluation-harness's "
                  "rolling windows; float32 max abs difference from ours "
                  f"{'-' if diff is None else f'{diff:.1e}'}); the plain loop scores each "
                  "document's last window without the context before it.", ""]
    ours = next((e for e in w["entries"] if e["impl"] == "ours" and e["dtype"] == s["dtype"]),
                None)
    real = ours["computed_per_scored"] if ours else None
    lines += [f"Computed / scored tokens of ours ({s['dtype']}): real text {_n(real, 3)}; "
              f"synthetic corpus of workload 2's kind with about the same tokens "
              f"({s['docs']} documents, {s['tokens']:,} tokens, median {s['median']:.0f}) "
              f"{_n(s['computed_per_scored'], 3)} (one run, {_n(s['tokens_per_s'])} tokens/s).",
              ""]
    return lines
