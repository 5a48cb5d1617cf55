"""Crash and rerun: `gpt2-pipeline score` SIGKILLed at seeded random points, then rerun.

A job writes one file per input work item (`pipeline.resume`): rows stream into
`<output>/_resume/tmp/` and are renamed to `<output>/part-<item>.*` when the item is complete.
So a `part-*` file is never partial, but a killed job leaves complete-looking files of an
incomplete run, and its temp files. Hence `pipeline.jobs.run` writes `<output>/_SUCCESS` last,
`pipeline.writers.read_output` refuses marker-less output with resume state left, and
`--overwrite` deletes everything of the previous attempt (temp files and marker included);
`--resume` (tests/reliability/test_resume_kill.py) keeps what was complete instead.

After every kill: every `part-*` file under the output and errors prefixes is a complete,
readable Parquet/JSONL file; without the marker the output is not taken for finished output;
with it (a kill after the end) it equals the uninterrupted run. Each next attempt reruns the
same command with --overwrite over the leftovers of the last; the final one is not killed and
must give exactly the rows and errors of the uninterrupted run: nothing lost, nothing twice.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rel_helpers import (
    REPO,
    check_part_file,
    cli_command,
    cli_env,
    files_under,
    read_errors,
    run_cli,
    sorted_errors,
    sorted_rows,
)

from pipeline.formats import InputError
from pipeline.formats.base import item_key
from pipeline.output import SUCCESS_MARKER, errors_path, is_complete
from pipeline.writers import read_output

SEED = 20240611
FILES, LINES = 3, 90
BAD = {5: b'{"text": ', 17: b"", 41: b'{"text": 12}', 66: b'{"text": "caf\xe9"}'}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int, int]:
    """(pattern, records, bad records): short texts, a few bad lines per file."""
    root = tmp_path_factory.mktemp("crash-in")
    rng = random.Random(SEED)
    words = ["river", "stone", "light", "paper", "seven", "quiet", "north", "glass"]
    for f in range(FILES):
        lines = []
        for i in range(LINES):
            text = f"file {f} line {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 6)))
            lines.append(BAD.get(i, json.dumps({"text": text}).encode()))
        (root / f"shard-{f}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return str(root / "*.jsonl"), FILES * LINES, FILES * len(BAD)


def _args(corpus: str, model: str, output: Path, *extra: str) -> list[str]:
    # A small batch budget: many batches, so the model step takes a while and kills land in it.
    return ["score", "--input", corpus, "--output", str(output), "--model", model,
            "--max-tokens-per-batch", "64", "--bucket-boundaries", "16", "--no-progress",
            *extra]


def _state(output: Path) -> dict:
    """Check every part-* file is complete; say what a kill left behind."""
    parts = [p for p in files_under(str(output)) if p.name.startswith("part-")
             and "/_resume/" not in str(p)]
    rows = {str(p): check_part_file(p) for p in parts}
    return {"parts": rows, "temp": [str(p) for p in files_under(str(output))
                                    if "/_resume/tmp/" in str(p)],
            "complete": is_complete(str(output))}


def _temp_files(output: Path) -> set[Path]:
    return {p for p in files_under(str(output)) if "/_resume/tmp/" in str(p)}


def _run(args: list[str], output: Path, kill_at: float | None = None,
         after_writing: float | None = None) -> tuple[int, str, float | None, float]:
    """Run the CLI; SIGKILL it `kill_at` s after the start, or `after_writing` s after the
    sinks' temp files appear; neither: let it finish. -> (status, stderr, when the temp files
    appeared (None if never seen), when it ended)."""
    leftovers = _temp_files(output)  # a killed attempt's, deleted by this one's --overwrite
    start = time.monotonic()
    seen = None
    proc = subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            now = time.monotonic() - start
            if seen is None and _temp_files(output) - leftovers:
                seen = now
            if (kill_at is not None and now >= kill_at) or (
                    after_writing is not None and seen is not None
                    and now >= seen + after_writing):
                proc.send_signal(signal.SIGKILL)
                break
            if now > 240:
                raise AssertionError("the job neither finished nor reached the kill point")
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, seen, time.monotonic() - start


@pytest.fixture(scope="module")
def reference(corpus, tiny_checkpoint, tmp_path_factory):
    """The uninterrupted run: its output, and its timeline (temp files seen at, end)."""
    pattern, n_records, n_bad = corpus
    output = tmp_path_factory.mktemp("crash-ref") / "out"
    status, stderr, writing_at, duration = _run(_args(pattern, str(tiny_checkpoint), output),
                                                output)
    assert status == 0, stderr
    assert f"{n_records} records in" in stderr and f"{n_bad} errors [ok]" in stderr
    rows = sorted_rows(read_output(str(output)))
    errors = sorted_errors(read_errors(str(output)))
    assert len(rows) + len(errors) == n_records and len(errors) == n_bad
    assert writing_at is not None
    return output, rows, errors, writing_at, duration


def test_kill_at_random_points_then_rerun(corpus, tiny_checkpoint, reference, tmp_path):
    pattern, n_records, n_bad = corpus
    model = str(tiny_checkpoint)
    _, want_rows, want_errors, writing_at, duration = reference
    output = tmp_path / "out"
    rng = random.Random(SEED)
    # Seeded kill points on the reference run's timeline: one before the sinks open (start-up,
    # validation, reading), one the moment their temp files appear, one while the model step
    # feeds the open sinks or they finalize (timed from the temp files, as start-up varies).
    kill_points = [(rng.uniform(0.3 * writing_at, writing_at), None), (None, 0.0),
                   (None, rng.uniform(0.1, 0.8) * (duration - writing_at))]
    report = []
    for attempt, (kill_at, after_writing) in enumerate(kill_points):
        extra = ("--overwrite",) if attempt else ()
        status, _, _, took = _run(_args(pattern, model, output, *extra), output, kill_at,
                                  after_writing)
        state = _state(output)  # raises if any part-* file is partial
        report.append((f"{kill_at:.2f}s" if kill_at else f"writing+{after_writing:.2f}s",
                       round(took, 2), status, len(state["parts"]), len(state["temp"]),
                       state["complete"]))
        if state["temp"]:  # a write was cut short: never taken for finished output
            assert not state["complete"]
            with pytest.raises(InputError):  # "interrupted", or no shards at all yet
                read_output(str(output))
        elif state["complete"]:
            # The kill came after the end: the output is the complete run's.
            assert sorted_rows(read_output(str(output))) == want_rows
            assert sorted_errors(read_errors(str(output))) == want_errors
        elif state["parts"]:  # complete items of an unfinished run: not taken for finished
            with pytest.raises(InputError, match="interrupted"):
                read_output(str(output))
    print(f"\n[crash] uninterrupted run {duration:.1f}s, temp files from {writing_at:.1f}s; "
          f"kills (at, ended, status, part files, temp files, marker): {report}")
    assert sum(1 for r in report if r[2] == -signal.SIGKILL) >= 2  # they were really killed

    # The same command once more, not killed: exactly the uninterrupted run's output.
    proc = run_cli(*_args(pattern, model, output, "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    assert sorted_rows(read_output(str(output))) == want_rows
    assert sorted_errors(read_errors(str(output))) == want_errors
    assert is_complete(str(output))
    names = {p.name for p in files_under(str(output))}
    keys = {item_key(f"{pattern[:-len('*.jsonl')]}shard-{f}.jsonl") for f in range(FILES)}
    assert names == ({f"part-{k}.parquet" for k in keys} | {f"part-{k}.jsonl" for k in keys}
                     | {"_SUCCESS"})
    marker = json.loads((output / SUCCESS_MARKER).read_text())
    assert (marker["input_records"], marker["result_records"], marker["error_records"]) == (
        n_records, n_records - n_bad, n_bad)


def test_half_finalized_output_is_not_taken_for_finished(reference, tmp_path):
    """The state a kill between two items' completions leaves, made exactly: some items'
    files in place, another's still in the temp directory, the resume state, no marker."""
    output = tmp_path / "out"
    shutil.copytree(reference[0], output)
    shutil.copytree(errors_path(str(reference[0])), errors_path(str(output)))
    rows = read_output(str(output))
    shard = sorted(output.glob("part-*"))[0]
    temp = output / "_resume" / "tmp"
    temp.mkdir(parents=True)
    shard.rename(temp / (shard.stem + ".0123abcd.parquet"))
    (output / SUCCESS_MARKER).unlink()
    with pytest.raises(InputError, match="interrupted"):
        read_output(str(output))
    # Numbered shards (a filter's routing pass writes them with Beam's writers): a missing
    # shard of several is caught too.
    shutil.rmtree(output / "_resume")
    for p in output.glob("part-*"):
        p.unlink()
    one = sorted(reference[0].glob("part-*"))[0]
    for i in (1, 2):
        shutil.copy(one, output / f"part-0000{i}-of-00003.parquet")
    with pytest.raises(InputError, match=r"shards \[1, 2\] of 3"):
        read_output(str(output))
    # The marker is what says "finished": with it the same files read as they are.
    (output / SUCCESS_MARKER).write_text("{}")
    assert len(read_output(str(output))) == 2 * pq.read_table(one).num_rows
    assert rows
