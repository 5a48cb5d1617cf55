"""Executables on disk (gpt2model.aot): a later process neither compiles nor traces the scorer.

Real processes, since JAX fixes its cache directory at a process's first compile: each run
scores the same batch in a fresh interpreter and reports what it did (programs loaded from
disk, jaxpr traces of the scoring function) and its log-probs. JAX's own cache keeps every
program, as the pipeline sets it: an executable JAX read from that cache does not serialize
whole on the CPU, which the tiny model showed only once JAX cached its fast compiles.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import jax, jax.monitoring, numpy as np
traces = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: traces.append(kw.get("fun_name"))
    if event.endswith("jaxpr_trace_duration") else None)
cache, ckpt, length, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if cache != "off":  # as pipeline.handler.use_compilation_cache: every program is cached
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import jax.numpy as jnp
from gpt2model import Scorer, from_pretrained
config, params = from_pretrained(ckpt)
scorer = Scorer(config, params, dtype=getattr(jnp, dtype))
ids = (np.arange(2 * length, dtype=np.int32).reshape(2, length) * 7) % config.vocab_size
lp, _ = scorer(ids, np.roll(ids, -1, axis=1), np.ones_like(ids))
print(json.dumps({"loaded": scorer._fn.loaded, "programs": scorer.compile_count,
                  "traced": traces.count("_score_batch"), "logprobs": np.asarray(lp).tolist()}))
"""


def _run(cache: Path | str, ckpt: Path, length: int = 16, dtype: str = "float32") -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(ckpt), str(length),
                           dtype], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
                               "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def _executables(cache: Path) -> set[str]:
    return {p.name for p in (cache / "executables").glob("*.pkl")}


def test_a_second_process_loads_the_program_untraced(tmp_path, tiny_checkpoint):
    cache = tmp_path / "xla"
    first = _run(cache, tiny_checkpoint)
    assert (first["loaded"], first["programs"], first["traced"]) == (0, 1, 1)
    stored = _executables(cache)
    assert len(stored) == 1
    second = _run(cache, tiny_checkpoint)
    assert (second["loaded"], second["programs"], second["traced"]) == (1, 1, 0)
    np.testing.assert_array_equal(second["logprobs"], first["logprobs"])
    assert _executables(cache) == stored  # nothing new written


def test_other_shapes_and_dtypes_are_other_programs(tmp_path, tiny_checkpoint):
    cache = tmp_path / "xla"
    _run(cache, tiny_checkpoint)
    longer = _run(cache, tiny_checkpoint, length=24)
    bf16 = _run(cache, tiny_checkpoint, dtype="bfloat16")
    assert longer["loaded"] == bf16["loaded"] == 0
    assert len(_executables(cache)) == 3


def test_a_corrupt_file_is_compiled_again_and_replaced(tmp_path, tiny_checkpoint):
    cache = tmp_path / "xla"
    first = _run(cache, tiny_checkpoint)
    (path,) = (cache / "executables").glob("*.pkl")
    path.write_bytes(b"not a program")
    again = _run(cache, tiny_checkpoint)
    assert (again["loaded"], again["traced"]) == (0, 1)
    assert "ignoring unreadable executable" in again["stderr"]
    np.testing.assert_array_equal(again["logprobs"], first["logprobs"])
    assert _run(cache, tiny_checkpoint)["loaded"] == 1  # the replacement is read back


def test_no_cache_directory_writes_nothing(tmp_path, tiny_checkpoint):
    got = _run("off", tiny_checkpoint)
    assert (got["loaded"], got["programs"]) == (0, 1)
    assert not any(tmp_path.iterdir())


def test_a_program_jax_already_cached_is_stored_whole(tmp_path, tiny_checkpoint):
    """JAX's cache holds the program but our executable is gone (a cleaned directory, another
    package version's run): the program stored now must run when read back. Written from
    JAX's cached copy it failed at run time (NOT_FOUND: Function select_bitcast_fusion)."""
    cache = tmp_path / "xla"
    first = _run(cache, tiny_checkpoint)
    for path in (cache / "executables").glob("*.pkl"):
        path.unlink()
    again = _run(cache, tiny_checkpoint)
    assert again["loaded"] == 0 and len(_executables(cache)) == 1
    third = _run(cache, tiny_checkpoint)
    assert (third["loaded"], third["traced"]) == (1, 0)
    assert "failed on its first call" not in third["stderr"]
    np.testing.assert_array_equal(third["logprobs"], first["logprobs"])


def test_a_stored_program_that_fails_to_run_is_compiled_again(tmp_path, tiny_checkpoint):
    """A file that loads but does not run (here another shape's program under this shape's
    key) costs a compile and a warning, not the job; the file is replaced."""
    cache = tmp_path / "xla"
    want = _run(cache, tiny_checkpoint)
    (mine,) = _executables(cache)
    _run(cache, tiny_checkpoint, length=24)
    (other,) = _executables(cache) - {mine}
    (cache / "executables" / mine).write_bytes((cache / "executables" / other).read_bytes())
    got = _run(cache, tiny_checkpoint)
    assert "failed on its first call" in got["stderr"]
    assert (got["loaded"], got["traced"]) == (0, 1)
    np.testing.assert_array_equal(got["logprobs"], want["logprobs"])
    back = _run(cache, tiny_checkpoint)
    assert (back["loaded"], back["traced"]) == (1, 0)  # the replacement runs
