"""Workload 11: the kernel study: each matmul of the scoring step, per operand form and XLA flag.

For each matmul of one scoring step at the step's own shapes (rows x length tokens: c_attn,
attention c_proj, MLP c_fc and c_proj, attention's two batched products per head over the
128-query causal blocks `causal_attend` runs, and the tied LM head on the 128-row logit chunk
`head_scores` runs) this measures GFLOP/s of:

- the dtype forms: float32 (`f32`); bf16 operands with a float32 result (`bf16>f32`,
  `preferred_element_type=float32`, what gpt2model/model.py asks for); bf16 in, bf16 out
  (`bf16`); inputs as the step has them (float32 activations cast inside, weights stored in
  the compute dtype by `compute_params`; q, k, v and the softmax weights in the compute dtype);
- layout forms in float32 (and the head's in bf16>f32 too): einsum vs dot_general, the
  weight stored [out, in] (PyTorch's) vs [in, out], the head as wte [V, E] contracted on E
  (the model's) vs a pre-transposed [E, V], attention in [B, T, H, D] (no head transpose)
  or with k / v pre-transposed [B, H, D, S];

each under several XLA_FLAGS settings (`CONFIGS`). XLA reads its flags once, when jax is
imported, so every setting is its own long-lived worker process (`python -m
bench.kernel_forms`, driven over stdin/stdout); the parent times them interleaved (repeat r: every
setting, every form), so a burst of load on a shared machine hits all of them alike. The
kernel XLA picked is read off the optimized HLO of each compiled form (bench/hlo.py), and
each form's result is checked against float64 numpy on a slice of the output (the forms and
the worker are in bench/kernel_forms.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, SETTLE_S, log, spread

# name -> XLA_FLAGS. By default this jaxlib hands dots to YNNPACK. `onednn` is the flag alone,
# as a user would set it (in jaxlib 0.10 it leaves every program here unchanged: YNNPACK still
# takes the dots); `onednn-dot` also enables oneDNN's dot fusion, which takes the float32 dots
# (bf16 ones stay with YNNPACK); `eigen` limits YNNPACK to elementwise fusions, which leaves
# float32 dots to XLA's own dot thunk (Eigen).
CONFIGS: dict[str, str] = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn-dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=eltwise",
}
MATMULS = ("c_attn", "attn_c_proj", "mlp_c_fc", "mlp_c_proj", "attn_scores", "attn_values",
           "lm_head")
BASE_FORMS = ("f32", "bf16>f32", "bf16")  # the dtype forms; the model's own layout
MIN_SAMPLE_S = 0.15  # calls per timed sample: enough to last this long
CHECK_ROWS = 16  # output rows compared with float64 numpy


def spec_of(config, rows: int, length: int) -> dict[str, int]:
    """The shapes of one scoring step of `rows` x `length` tokens of a model `config`."""
    from gpt2model.model import QUERY_BLOCK
    from gpt2model.scoring import LOGIT_CHUNK_ROWS

    return {"n_embd": config.n_embd, "n_head": config.n_head, "head_dim": config.head_dim,
            "inner": config.inner_dim, "vocab": config.vocab_size, "n_layer": config.n_layer,
            "rows": rows, "length": length, "chunk": min(LOGIT_CHUNK_ROWS, rows * length),
            "block": QUERY_BLOCK}


def causal_blocks(spec: dict[str, int]) -> list[tuple[int, int, int]]:
    """(query start, query count, key count) of each causal block, as `causal_attend` cuts."""
    t, blk = spec["length"], spec["block"]
    if t <= blk:
        return [(0, t, t)]
    return [(i, min(blk, t - i), i + min(blk, t - i)) for i in range(0, t, blk)]


def shape_text(name: str, spec: dict[str, int]) -> str:
    b, t, e, f = spec["rows"], spec["length"], spec["n_embd"], spec["inner"]
    h, d, v, c = spec["n_head"], spec["head_dim"], spec["vocab"], spec["chunk"]
    blocks = causal_blocks(spec)
    q, nb = blocks[0][1], len(blocks)
    ss = f"{blocks[0][2]}..{blocks[-1][2]}" if len(blocks) > 1 else str(blocks[0][2])
    return {
        "c_attn": f"[{b * t}x{e}]@[{e}x{3 * e}]",
        "attn_c_proj": f"[{b * t}x{e}]@[{e}x{e}]",
        "mlp_c_fc": f"[{b * t}x{e}]@[{e}x{f}]",
        "mlp_c_proj": f"[{b * t}x{f}]@[{f}x{e}]",
        "attn_scores": f"{b}x{h} heads x {nb} blocks: [{q}x{d}]@[{d}xS], S={ss}",
        "attn_values": f"{b}x{h} heads x {nb} blocks: [{q}xS]@[Sx{d}], S={ss}",
        "lm_head": f"[{c}x{e}]@wte[{v}x{e}]^T",
    }[name]


def flops(name: str, spec: dict[str, int]) -> float:
    """FLOPs of one call (2 per multiply-add)."""
    b, t, e, f = spec["rows"], spec["length"], spec["n_embd"], spec["inner"]
    if name in ("attn_scores", "attn_values"):
        return float(sum(2 * b * spec["n_head"] * q * s * spec["head_dim"]
                         for _, q, s in causal_blocks(spec)))
    if name == "lm_head":
        return 2.0 * spec["chunk"] * e * spec["vocab"]
    k, n = {"c_attn": (e, 3 * e), "attn_c_proj": (e, e), "mlp_c_fc": (e, f),
            "mlp_c_proj": (f, e)}[name]
    return 2.0 * b * t * k * n


def calls_per_step(name: str, spec: dict[str, int]) -> int:
    """How many times one scoring step runs this call (per layer for the layers' matmuls)."""
    if name == "lm_head":
        return math.ceil(spec["rows"] * spec["length"] / spec["chunk"])
    return spec["n_layer"]


class Worker:
    """One `python -m bench.kernel_forms` process under one XLA_FLAGS setting."""

    def __init__(self, name: str, flags: str, log_dir: Path) -> None:
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        self.name = name
        self.stderr_path = Path(log_dir) / f"kernels-{name}.log"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kernel_forms"],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self._stderr.flush()
            tail = "\n".join(self.stderr_path.read_text().strip().splitlines()[-10:])
            raise RuntimeError(f"kernel worker {self.name} died:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"kernel worker {self.name}: {reply['error']}")
        return reply

    def call(self, **msg: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def _rotated(items: list[str], r: int) -> list[str]:
    """`items` starting at position r: each repeat changes who goes first after a switch."""
    k = r % len(items)
    return items[k:] + items[:k]


def _interleaved(workers: dict[str, Worker], forms: list[str], calls: dict[str, int],
                 repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of every (setting, form), round-robin over settings and forms."""
    names = list(workers)
    times: dict[tuple[str, str], list[float]] = {(n, f): [] for n in names for f in forms}
    for r in range(repeats):
        for n in _rotated(names, r):
            for f in _rotated(forms, r):
                time.sleep(SETTLE_S)
                times[n, f].append(workers[n].call(op="time", form=f, calls=calls[f])["seconds"])
    return times


def run(ctx) -> dict[str, Any]:
    """Every matmul x form x XLA setting, interleaved; per cell GFLOP/s and the kernel; then
    the whole scoring step per dtype under each setting."""
    from bench.models import checkpoint, model_config

    size = ctx.sizes[0]
    spec = spec_of(model_config(size), ctx.kernel_rows, ctx.kernel_length)
    names = list(ctx.kernel_configs)
    workers = {n: Worker(n, CONFIGS[n], ctx.work_dir) for n in names}
    entries, steps = [], []
    try:
        for w in workers.values():
            w.read()  # ready: jax imported under its flags
        for mm in MATMULS:
            log(f"kernels: {mm} {shape_text(mm, spec)}")
            loaded = {n: {r["form"]: r for r in workers[n].call(op="load", spec=spec,
                                                               matmul=mm)["forms"]}
                      for n in names}
            forms = list(loaded[names[0]])
            calls = {f: 1 if ctx.quick else max(1, math.ceil(MIN_SAMPLE_S / max(
                min(loaded[n][f]["warm_s"] for n in names), 1e-6))) for f in forms}
            times = _interleaved(workers, forms, calls, ctx.kernel_repeats)
            work = flops(mm, spec)
            for f in forms:
                e: dict[str, Any] = {"matmul": mm, "shape": shape_text(mm, spec), "form": f,
                                     "flops": work, "calls_per_sample": calls[f],
                                     "calls_per_step": calls_per_step(mm, spec), "by_config": {}}
                for n in names:
                    sec = spread(times[n, f])
                    got = loaded[n][f]
                    e["by_config"][n] = {
                        "seconds": sec, "kernel": got["kernel"], "program": got["program"],
                        "same_program_as_f32": got["program"] == loaded[n]["f32"]["program"],
                        "rel_err": got["rel_err"], "compile_s": got["compile_s"],
                        "gflops": {"median": work / sec["median"] / 1e9,
                                   "min": work / sec["max"] / 1e9, "max": work / sec["min"] / 1e9}}
                entries.append(e)
        model = str(checkpoint(size, ctx.cache_dir))
        rows, length = ctx.kernel_step_rows, ctx.kernel_length
        log(f"kernels: whole scoring step {rows}x{length}, {', '.join(ctx.dtypes)}, per setting")
        loaded = {n: {r["form"]: r for r in workers[n].call(
            op="load_step", model=model, rows=rows, length=length,
            dtypes=list(ctx.dtypes))["forms"]} for n in names}
        forms = list(loaded[names[0]])
        times = _interleaved(workers, forms, dict.fromkeys(forms, 1), ctx.repeats)
        for f in forms:
            e = {"form": f, "dtype": f.split()[1], "rows": rows, "length": length,
                 "by_config": {}}
            for n in names:
                sec = spread(times[n, f])
                e["by_config"][n] = {
                    "seconds": sec, "first_s": loaded[n][f]["first_s"],
                    "mean_logprob": loaded[n][f]["mean_logprob"],
                    "tokens_per_s": {"median": rows * length / sec["median"],
                                     "min": rows * length / sec["max"],
                                     "max": rows * length / sec["min"]}}
            base = e["by_config"][names[0]]["tokens_per_s"]["median"]
            for n in names:
                e["by_config"][n]["vs_first"] = e["by_config"][n]["tokens_per_s"]["median"] / base
            steps.append(e)
    finally:
        for w in workers.values():
            w.close()
    return {"size": size, "spec": spec, "configs": {n: CONFIGS[n] for n in names},
            "entries": entries, "steps": steps, "summary": summarize(entries, names)}


def summarize(entries: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per config and dtype form, the step's matmul seconds (each call's median times its calls
    per step, summed), and per matmul the fastest float32 form and setting against the current
    one (form `f32` under the first config, the default flags)."""
    step: dict[str, dict[str, float]] = {}
    for n in names:
        step[n] = {}
        for form in BASE_FORMS:
            es = [e for e in entries if e["form"] == form]
            if es:
                step[n][form] = sum(e["by_config"][n]["seconds"]["median"] * e["calls_per_step"]
                                    for e in es)
    best: dict[str, Any] = {}
    for mm in dict.fromkeys(e["matmul"] for e in entries):
        es = [e for e in entries if e["matmul"] == mm]
        base = next(e for e in es if e["form"] == "f32")["by_config"][names[0]]["gflops"]
        cands = [(e["by_config"][n]["gflops"]["median"], e["form"], n) for e in es
                 for n in names if e["form"].startswith("f32")]
        rate, form, n = max(cands)
        groups: dict[str, list[float]] = {}  # one compiled program measured several times
        for e in es:
            for c in e["by_config"].values():
                groups.setdefault(c["program"], []).append(c["gflops"]["median"])
        noise = max((max(g) / min(g) for g in groups.values() if len(g) > 1), default=None)
        best[mm] = {"form": form, "config": n, "gflops": rate,
                    "vs_current": rate / base["median"], "same_program_spread": noise}
    return {"step_matmul_s": step, "best_f32": best}
