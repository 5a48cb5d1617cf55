"""Compiled programs kept on disk as executables, so a later process skips tracing and lowering.

JAX's persistent compilation cache (`jax_compilation_cache_dir`) saves XLA's compile, but its
key is the lowered program: every process still traces the model and lowers it to StableHLO
first, which for GPT-2's twelve layers and query-blocked attention is most of a cache hit's
cost (measured: trace 0.31-0.53 s + lower 0.14-0.23 s against 0.27 s loading the program;
BENCHMARKS.md, workload 13). `Programs` wraps a jitted function and keys its compiled
executables by the call's signature (argument tree, shapes, dtypes, shardings, static
arguments) plus everything else that decides the program: the wrapped function and model
(`tag`), this package's source, JAX's version and configuration, XLA_FLAGS and the devices. A
hit deserializes the executable (`jax.experimental.serialize_executable`); a miss traces,
lowers and compiles as jit would, then stores it. Executables live in `executables/` beside
JAX's cache, only when that cache is on (`jax_compilation_cache_dir` set): off means off.

A program to be stored is compiled with JAX's cache turned off (for this thread, for that one
compile): on the CPU, an executable JAX read from its own cache serializes without its code
(`NOT_FOUND: Function select_bitcast_fusion not found` when the copy runs; measured with
jax 0.10.2), so only freshly compiled programs are written. And a program read from disk whose
first call fails is compiled afresh and its file replaced, with a warning, rather than failing
the job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import jax
import jax.monitoring

log = logging.getLogger(__name__)

SUBDIR = "executables"
# A jax.monitoring duration event per executable read from disk (what a hit costs instead of
# tracing, lowering and compiling), for start-up accounting beside JAX's own compile events.
LOAD_EVENT = "/gpt2model/aot/executable_load_duration"


def _leaf(x: Any) -> tuple:
    """What a compiled program fixes of an argument: shape, dtype and (when placed) sharding."""
    sharding = getattr(x, "sharding", None)
    return (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
            None if sharding is None else repr(sharding))


def signature(args: tuple, static: dict[str, Any]) -> tuple:
    """The call's signature: argument tree, each leaf's shape/dtype/sharding, static values."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (str(tree), tuple(_leaf(x) for x in leaves), tuple(sorted(static.items())))


_SOURCE_DIGEST: str | None = None


def _source_digest() -> str:
    """sha256 of this package's Python source: an edited model never reuses an old program."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def _environment() -> str:
    import jaxlib

    config = {k: v for k, v in jax.config.values.items()
              if "compilation_cache" not in k and "persistent_cache" not in k}
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    return repr((jax.__version__, jaxlib.__version__, sorted(config.items(), key=str), devices,
                 os.environ.get("XLA_FLAGS", ""), _source_digest()))


def directory() -> Path | None:
    """Where executables go: beside JAX's persistent compilation cache, if it is on."""
    base = jax.config.jax_compilation_cache_dir
    return Path(base) / SUBDIR if base else None


def _jax_cache_off() -> Any:
    """A context in which this thread's compiles skip JAX's persistent cache (read and write),
    or None where this JAX has no such (private, thread-local) switch: then nothing is stored,
    since a program might come from JAX's cache and not serialize whole."""
    try:
        from jax._src.config import enable_compilation_cache
    except ImportError:
        return None
    return enable_compilation_cache(False)


class Programs:
    """A jitted function's compiled programs by call signature: from memory, from disk, or
    compiled (and then stored). `len()` is the number of programs this process holds, the
    count a jit's cache size gives: one per shape, however each was obtained."""

    def __init__(self, jitted: Any, tag: str):
        """jitted: a `jax.jit` function; tag: what identifies it beyond its arguments (the
        function's name and the module it closes over, e.g. the model's config and dtype)."""
        self.jitted, self.tag = jitted, tag
        self._programs: dict[tuple, Any] = {}
        self.loaded = 0  # programs read from disk (and run) rather than compiled

    def __len__(self) -> int:
        return len(self._programs)

    def __call__(self, *args: Any, **static: Any) -> Any:
        sig = signature(args, static)
        program = self._programs.get(sig)
        if program is None:
            path = self._path(sig)
            program = self._load(path) if path is not None else None
            if program is not None:
                try:  # a program read from disk proves itself on its first call (run
                    # errors surface when the result is ready, not at the dispatch)
                    out = jax.block_until_ready(program(*args))
                except Exception as err:
                    log.warning("executable %s failed on its first call, compiling it again: "
                                "%s", path, err)
                else:
                    self.loaded += 1
                    self._programs[sig] = program
                    return out
            program = self._programs[sig] = self._compile(args, static, path)
        return program(*args)

    def _path(self, sig: tuple) -> Path | None:
        where = directory()
        if where is None:
            return None
        key = hashlib.sha256(repr((self.tag, sig, _environment())).encode()).hexdigest()
        return where / f"{key}.pkl"

    def _compile(self, args: tuple, static: dict[str, Any], path: Path | None) -> Any:
        """Trace, lower and compile as jit would; with a path, compiled afresh (not read from
        JAX's cache, whose CPU executables do not serialize whole) and stored there."""
        lowered = self.jitted.trace(*args, **static).lower()
        fresh = _jax_cache_off() if path is not None else None
        if fresh is None:
            return lowered.compile()
        with fresh:
            compiled = lowered.compile()
        self._store(path, compiled)
        return compiled

    def _load(self, path: Path) -> Any:
        from jax.experimental.serialize_executable import deserialize_and_load

        start = time.perf_counter()
        try:
            with open(path, "rb") as fh:
                payload, in_tree, out_tree = pickle.load(fh)
            program = deserialize_and_load(payload, in_tree, out_tree)
        except FileNotFoundError:
            return None
        except Exception as err:  # a corrupt or foreign file: compile instead, then replace it
            log.warning("ignoring unreadable executable %s: %s", path, err)
            return None
        jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - start)
        return program

    @staticmethod
    def _store(path: Path, compiled: Any) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            blob = pickle.dumps(serialize(compiled))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing
        except Exception as err:  # a full disk or an unserializable program costs speed only
            log.warning("could not store executable %s: %s", path, err)
