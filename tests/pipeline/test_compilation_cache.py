"""The persistent compilation cache: a second run of the same job compiles nothing.

Real processes (JAX fixes its cache at a process's first compile): the CLI twice over the same
input with one cache directory. A program missing from the cache would be compiled and written
as a new entry, so "nothing new written by the second run" is "nothing compiled".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_second_run_compiles_nothing(tmp_path, tiny_checkpoint, mode):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"some words {i} " * (i + 1),
                                       "prompt": f"a prompt {i}"}) + "\n" for i in range(12)))
    cache = tmp_path / "xla"
    args = [mode, "--input", str(src), "--model", str(tiny_checkpoint), "--no-progress",
            "--compilation-cache", str(cache), "--max-tokens-per-batch", "128"]
    first = _cli(*args, "--output", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    written = _entries(cache)
    assert written, "the first run cached no program"
    assert len({Path(e).parts[0] for e in written}) == 1  # one directory: this CPU's
    second = _cli(*args, "--output", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert _entries(cache) == written  # every program came from the cache


def test_off_writes_no_cache(tmp_path, tiny_checkpoint):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a few words"}) + "\n")
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "score", "--input", str(src), "--output",
         str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--no-progress",
         "--compilation-cache", "off"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
             "PYTHONPATH": str(REPO), "HOME": str(home), "XDG_CACHE_HOME": str(home / ".c")})
    assert proc.returncode == 0, proc.stderr
    assert not (home / ".c").exists()
