"""`gpt2-pipeline ... --resume` after SIGKILL at seeded random points equals an uninterrupted run.

Each job is started, SIGKILLed at a random moment after one more work item completed than
before (so every kill lands mid-job, with some work done and some left), and rerun with
`--resume`, twice; the last rerun is not killed. Its output must be the uninterrupted run's
rows and errors, its `_SUCCESS` the same counts, and it must have reused records: the
in-process variant, stopping at exact points, is tests/pipeline/test_resume.py.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from rel_helpers import REPO, cli_command, cli_env, read_errors, sorted_errors

from pipeline.output import SUCCESS_MARKER
from pipeline.resume import RESUME
from pipeline.writers import read_output

SEED = 20261201
COUNTS = ("input_records", "output_rows", "result_records", "error_records", "tokens",
          "buckets")
WORDS = ["river", "stone", "light", "paper", "seven", "quiet", "north", "glass"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("kill-in")
    rng = random.Random(SEED)
    for f in range(FILES):
        lines = [json.dumps({"id": f"{f}-{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(
            1, 12))), "prompt": " ".join(rng.choices(WORDS, k=2))}) for i in range(24)]
        lines[5] = '{"text": '
        (root / f"shard-{f}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "*.jsonl")


FILES = 8
# Score and filter without packing here: best-fit packing keeps a few part-filled rows open
# until the end, and on a corpus this small that holds every item open until the end too (the
# in-process test covers packing, stopping at exact points instead).
MODES = {
    "score": ["score", "--no-pack"],
    "generate": ["generate", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3"],
    "filter": ["filter", "--quantiles", "0.5", "--no-pack"],
}


def _args(mode: str, corpus: str, model: str, output: Path) -> list[str]:
    return [*MODES[mode], "--input", corpus, "--output", str(output), "--model", model,
            "--id-field", "id", "--max-tokens-per-batch", "64", "--bucket-boundaries", "16",
            "--no-progress"]


def _complete_items(output: Path) -> int:
    return len(list((output / RESUME / "items").glob("*.json")))


def _run_and_kill(args: list[str], output: Path, rng: random.Random, leave: int = 1) -> int:
    """Start the CLI; SIGKILL it a random 0-0.4 s after one more item completed, or at once
    when only `leave` items are left (so a later attempt still has items to be killed in),
    unless all are complete by then. -> its exit status."""
    before = _complete_items(output)
    proc = subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, kill_at = time.monotonic(), None
    try:
        while proc.poll() is None:
            done = _complete_items(output)
            if kill_at is None and done > before:
                kill_at = time.monotonic() + rng.uniform(0.0, 0.4)
            if kill_at is not None and (time.monotonic() >= kill_at or done >= FILES - leave) \
                    and done < FILES and not (output / SUCCESS_MARKER).exists():
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() - start < 240, "the job never completed an item"
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), stderr
    return proc.returncode


def _rows(output: Path) -> list[dict]:
    parts = [output] + sorted(p for p in output.iterdir() if p.is_dir() and p.name != RESUME)
    rows = [r for p in parts if list(p.glob("part-*")) for r in read_output(str(p))]
    return sorted(rows, key=lambda r: (str(r["id"]), r.get("sample_index", 0)))


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) or (isinstance(a[k], list) and a[k]
                                           and isinstance(a[k][0], float)):
                np.testing.assert_allclose(np.array(a[k], float), np.array(b[k], float),
                                           rtol=1e-5, err_msg=k)
            else:
                assert a[k] == b[k], k


@pytest.mark.parametrize("mode", list(MODES))
def test_killed_then_resumed_equals_uninterrupted(corpus, tiny_checkpoint, tmp_path, mode):
    model = str(tiny_checkpoint)
    ref = tmp_path / "ref"
    done = subprocess.run(cli_command(*_args(mode, corpus, model, ref)), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "out"
    rng = random.Random(f"{SEED} {mode}")
    statuses = []
    for attempt in range(3):
        args = _args(mode, corpus, model, output) + (["--resume"] if attempt else [])
        statuses.append(_run_and_kill(args, output, rng, leave=2 if attempt == 0 else 1))
        if statuses[-1] == 0:
            break
        assert not (output / SUCCESS_MARKER).exists()
    assert statuses.count(-signal.SIGKILL) >= 2, statuses  # really killed mid-job, twice
    if statuses[-1] != 0:
        final = subprocess.run(cli_command(*_args(mode, corpus, model, output), "--resume"),
                               cwd=REPO, env=cli_env(), capture_output=True, text=True,
                               timeout=300)
        assert final.returncode == 0, final.stderr
        assert "reused from the interrupted run" in final.stderr
    _same(_rows(output), _rows(ref))
    assert sorted_errors(read_errors(str(output))) == sorted_errors(read_errors(str(ref)))
    got = json.loads((output / SUCCESS_MARKER).read_text())
    want = json.loads((ref / SUCCESS_MARKER).read_text())
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert 0 < got["reused_records"] < got["input_records"]
    assert not (output / RESUME).exists()
    print(f"\n[kill] {mode}: statuses {statuses}, reused {got['reused_records']} of "
          f"{got['input_records']} records")
