"""Executables on disk (gpt2model.aot): a later process neither compiles nor traces the scorer.

Real processes, since JAX fixes its cache directory at a process's first compile: each run
scores the same batch in a fresh interpreter and reports what it did (programs loaded from
disk, jaxpr traces of the scoring function) and its log-probs.
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
if cache != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
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
