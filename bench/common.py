"""Shared pieces of the harness: timing statistics, devices, machine facts, memory probes.

Every figure is the median of timed repeats taken after an untimed warm-up; min and max come
along as the spread. Ours and the peer are timed interleaved (ours, peer, ours, peer, ...), so
a burst of noise on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")


def log(message: str) -> None:
    """Progress on stderr, timestamped (stdout stays free for the result path)."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def spread(values: list[float]) -> dict[str, Any]:
    """{median, min, max, n, values} of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": list(values)}


def rate(work: float, seconds: dict[str, Any]) -> dict[str, float]:
    """Throughput spread from a time spread: the slowest repeat gives the minimum rate."""
    return {"median": work / seconds["median"], "min": work / seconds["max"],
            "max": work / seconds["min"]}


# Pause before each timed call: XLA's and PyTorch's (OpenMP) worker threads spin for a while
# after their work, and on a small CPU the spinning of one side would slow the other.
SETTLE_S = 0.1


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                     ) -> dict[str, dict[str, Any]]:
    """Time each callable `repeats` times after `warmup` untimed calls, round-robin.

    Each callable must block until its work is done (block_until_ready / synchronize). Returns
    per name {"first": seconds of the first call (includes compilation), "seconds": spread,
    "warmup_result": what the first call returned}.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        result = fn()
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
        out[name] = {"first": first, "warmup_result": result, "times": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            fn()
            out[name]["times"].append(time.perf_counter() - start)
    for entry in out.values():
        entry["seconds"] = spread(entry.pop("times"))
    return out


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_setup(device: str) -> None:
    """Same float32 matmul math as JAX: on a GPU, JAX's default precision runs float32 matmuls
    as TF32, while PyTorch defaults to full float32; let PyTorch use TF32 too."""
    if device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def torch_sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that change which matmul kernels XLA and PyTorch can use (x86 /proc/cpuinfo
# "flags", ARM "Features"). All of them present are recorded; SLUG_FLAGS, the ones that pick
# the float32/bfloat16 kernels, also name the results file, so two CPU kinds never share one.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "amx_fp16", "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm", "sme")
SLUG_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "sve",
              "sve2", "bf16", "i8mm", "sme")


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this machine's first CPU reports, in CPU_FLAGS order ([] if unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                have = set(value.split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine() -> dict[str, Any]:
    """What the numbers were measured on; `slug` (model, cores and kernel-relevant CPU flags on
    a CPU; the accelerator kind and count otherwise) names the results file and the report's
    section, so results of different machine kinds are never merged."""
    import jax

    cores = os.cpu_count() or 1
    cpu = _cpu_model()
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_cores": cores, "cpu_flags": flags, "platform": platform.platform(),
        "python": platform.python_version(), "jax_backend": jax.default_backend(),
        "jax_devices": [str(d.device_kind) for d in jax.local_devices()],
        "torch_device": torch_device(),
    }
    if info["jax_backend"] != "cpu":
        kinds = info["jax_devices"]
        info["accelerator"] = kinds[0] if kinds else info["jax_backend"]
        info["slug"] = f"{_slug(info['accelerator'])}-x{len(kinds)}"
    else:
        # Results files written before the flags were recorded are named without them.
        tag = "-".join(f.replace("_", "") for f in flags if f in SLUG_FLAGS)
        info["slug"] = f"{_slug(cpu)}-{cores}c" + (f"-{tag}" if tag else "")
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "tokenizers",
                 "apache-beam", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def add_study_options(parser: Any) -> None:
    """The options every `bench.*_study` takes: --repeats, --out (its JSON's directory) and
    --cache-dir (where the random gpt2 checkpoint is kept)."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "studies"))
    parser.add_argument("--cache-dir", default=str(REPO / "bench" / ".cache"))


def write_study(res: dict[str, Any], out: str | Path, kind: str, summary: str) -> Path:
    """A study's figures as `<out>/<kind>-<machine slug>-<date>.json`, its summary on stdout."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{kind}-{res['machine']['slug']}-{res['date']}.json"
    dest.write_text(json.dumps(res, indent=1) + "\n")
    print(summary)
    log(f"wrote {dest}")
    return dest


def today() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
    except OSError:
        pass
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process plus all its descendants (Linux /proc; 0 elsewhere)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_bytes(p)
        stack += _children(p)
    return total
