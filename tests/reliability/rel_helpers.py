"""Helpers of the reliability tests: running the CLI in a subprocess, reading outputs back.

Not a test module (no `test_` prefix); the test files import it by name, since pytest puts this
directory on sys.path for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import REPO, cli_env  # noqa: F401 (the reliability tests import them from here)

from pipeline.output import errors_path

# How many generated cases each property test tries: small in CI (each Beam run costs seconds),
# more on demand, e.g. RELIABILITY_EXAMPLES=200 pytest tests/reliability.
EXAMPLES_ENV = "RELIABILITY_EXAMPLES"


def examples(ci_default: int) -> int:
    """The number of hypothesis examples: `ci_default`, or the env var when it is set."""
    value = os.environ.get(EXAMPLES_ENV)
    return int(value) if value else ci_default


def on_demand() -> bool:
    """True when a longer run was asked for (the env var is set)."""
    return bool(os.environ.get(EXAMPLES_ENV))


def cli_command(*args: str) -> list[str]:
    """The `gpt2-pipeline` console script when installed next to this Python, else `-m`."""
    script = Path(sys.executable).parent / "gpt2-pipeline"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "pipeline.cli", *args]


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run the CLI to completion in a subprocess; text output captured."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (`gpt2-pipeline: error: ...`)."""
    return [line for line in stderr.splitlines() if line.startswith("gpt2-pipeline: error:")]


def read_errors(output: str) -> list[dict]:
    """Every error row of a job, from its `<output>-errors/part-*.jsonl` shards."""
    rows = []
    for path in sorted(Path(errors_path(output)).glob("part-*")):
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085, \x1c..., which
        # JSON text may hold unescaped.
        text = path.read_text(encoding="utf-8")
        rows += [json.loads(line) for line in text.split("\n") if line]
    return rows


def files_under(output: str) -> list[Path]:
    """Every file under the output and its errors prefix (hidden and temp files included)."""
    found = []
    for root in (Path(output), Path(errors_path(output))):
        if root.exists():
            found += [p for p in root.rglob("*") if p.is_file()]
    return sorted(found)


def check_part_file(path: Path) -> int:
    """Assert a `part-*` file is complete and readable; return its row count."""
    if path.suffix == ".parquet":
        return pq.read_table(path).num_rows  # raises on a partial file (no footer)
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends mid-line"
    lines = [line for line in data.split(b"\n") if line]
    for line in lines:
        json.loads(line)
    return len(lines)


def sorted_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (str(r["id"]), r.get("sample_index", 0),
                                       json.dumps(r, sort_keys=True, default=str)))


def sorted_errors(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["source"], r["line"]))
