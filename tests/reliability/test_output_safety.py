"""Output safety: a non-empty output is refused unless --overwrite; with --overwrite nothing of
the previous run survives next to the new one; a refused or failed rerun leaves the old output
as it was; the input can never be deleted by the output's overwrite.

tests/pipeline/test_io.py checks `prepare_output` alone and tests/pipeline/test_jobs.py the
plain refusal; these go end to end through `pipeline.jobs.run` and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rel_helpers import error_lines, files_under, read_errors, sorted_rows

from pipeline import cli, jobs
from pipeline.config import JobConfig
from pipeline.formats import InputError
from pipeline.formats.base import item_key
from pipeline.output import SUCCESS_MARKER, is_complete
from pipeline.writers import read_output

LINES = [json.dumps({"text": f"sentence number {i}"}) for i in range(6)] + ["{broken"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("safety-in") / "in.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    return str(path)


def _config(corpus: str, model, output: Path, **kw) -> JobConfig:
    return JobConfig(input=corpus, output=str(output), model=str(model), progress=False,
                     max_tokens_per_batch=128, **kw)


def _snapshot(output: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in files_under(str(output))}


def test_non_empty_output_is_refused_in_every_form(corpus, tiny_checkpoint, tmp_path):
    """Results, errors or any stray file under either prefix count as 'non-empty'."""
    layouts = {
        "errors-only": {"out-errors/part-00000-of-00001.jsonl": b"{}\n"},
        "stray-file": {"out/notes.txt": b"mine"},
        "temp-leftover": {"out/beam-temp-part-123/abc.part.parquet": b"PAR1"},
        "marker-only": {"out/_SUCCESS": b"{}"},
    }
    for name, files in layouts.items():
        root = tmp_path / name
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        output = root / "out"
        before = _snapshot(output)
        result = CliRunner().invoke(
            cli.main, ["score", "--input", corpus, "--output", str(output), "--model",
                       str(tiny_checkpoint), "--no-progress"], prog_name="gpt2-pipeline")
        assert result.exit_code == 2, (name, result.output)
        [line] = error_lines(result.stderr)
        assert "--overwrite" in line and str(output) in line, line
        assert _snapshot(output) == before, name


def test_overwrite_leaves_only_the_new_run(corpus, tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    # A previous run: JSONL shards, then debris of runs with other shard counts and a killed one.
    first = jobs.run(_config(corpus, tiny_checkpoint, output, output_format="jsonl"))
    assert first.error_records == 1
    stale = {
        "out/part-00000-of-00003.parquet": b"old shard",
        "out/part-00002-of-00003.parquet": b"old shard",
        "out/beam-temp-part-0123/0d6e.part.parquet": b"half written",
        "out-errors/part-00001-of-00002.jsonl": b'{"source": "old"}\n',
        "out-errors/beam-temp-part-4567/9a.part.jsonl": b'{"source": "old"',
    }
    for rel, data in stale.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    old = set(_snapshot(output))
    assert len(old) == 3 + len(stale)  # results, errors, _SUCCESS + the debris

    summary = jobs.run(_config(corpus, tiny_checkpoint, output, overwrite=True))
    names = {str(p.relative_to(tmp_path)) for p in files_under(str(output))}
    key = item_key(str(corpus))  # output is named after the input work item it came from
    assert names == {f"out/part-{key}.parquet", "out/_SUCCESS", f"out-errors/part-{key}.jsonl"}
    rows = read_output(str(output))
    assert sorted(r["id"] for r in rows) == [f"in.jsonl:{i}" for i in range(6)]
    assert [e["line"] for e in read_errors(str(output))] == [6]
    marker = json.loads((output / SUCCESS_MARKER).read_text())
    assert marker["input_records"] == summary.input_records == len(LINES)


def test_refused_or_failed_overwrite_keeps_the_old_output(corpus, tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    jobs.run(_config(corpus, tiny_checkpoint, output))
    before = _snapshot(output)
    rows = sorted_rows(read_output(str(output)))
    # A rerun that cannot start (missing input, broken model) must not delete anything first.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    for change in ({"input": str(tmp_path / "nothing-*.jsonl")}, {"model": str(broken)},
                   {"keep_fields": ("id",)}):
        with pytest.raises(ValueError):
            jobs.run(_config(corpus, tiny_checkpoint, output, overwrite=True).replace(**change))
        assert _snapshot(output) == before, change
    assert is_complete(str(output))
    assert sorted_rows(read_output(str(output))) == rows


def test_overwrite_never_deletes_the_input(tiny_checkpoint, tmp_path):
    """An input inside the output location would be deleted by --overwrite before being read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("\n".join(LINES) + "\n")
    for output, pattern in ((data, str(data / "*.jsonl")),
                            (tmp_path / "da", str(tmp_path / "da-errors" / "*.jsonl"))):
        if not Path(pattern).parent.exists():
            Path(pattern).parent.mkdir()
            (Path(pattern).parent / "in.jsonl").write_text("\n".join(LINES) + "\n")
        with pytest.raises(InputError, match="output"):
            jobs.run(JobConfig(input=pattern, output=str(output), model=str(tiny_checkpoint),
                               overwrite=True, progress=False))
        assert (Path(pattern).parent / "in.jsonl").read_text().count("\n") == len(LINES)


def test_output_that_is_a_file(corpus, tiny_checkpoint, tmp_path):
    target = tmp_path / "results.parquet"
    target.write_bytes(b"someone's file")
    result = CliRunner().invoke(
        cli.main, ["score", "--input", corpus, "--output", str(target), "--model",
                   str(tiny_checkpoint), "--no-progress", "--overwrite"],
        prog_name="gpt2-pipeline")
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.stderr)
    assert str(target) in line and "not a directory" in line, line
    assert target.read_bytes() == b"someone's file"
