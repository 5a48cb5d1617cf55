"""A batch whose model call fails is split and retried; only the records that still fail alone
become error rows, and every other record's numbers equal a clean run's.

Failures are injected through `pipeline.handler.FAULT_HOOK` (called with each batch's items
before its model call, raising as a device error would); the model itself runs for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import handler, jobs
from pipeline.config import JobConfig
from pipeline.output import errors_path
from pipeline.writers import read_output

WORDS = ["river", "stone", "quiet", "market", "winter", "lantern", "orbit", "ember"]


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 20)))) for _ in range(n)]


@pytest.fixture
def poison(monkeypatch):
    """Make every model call fail whose batch holds a record with POISON in its key."""
    calls = []

    def hook(items, length):
        calls.append(len(items))
        keys = [getattr(it, "key", "") for it in items]
        if any(k in hook.bad for k in keys):
            raise RuntimeError("RESOURCE_EXHAUSTED: injected out of memory" if hook.oom
                               else "injected XLA failure")

    hook.bad, hook.oom, hook.calls = set(), False, calls
    monkeypatch.setattr(handler, "FAULT_HOOK", hook)
    return hook


def _same(a: dict, b: dict) -> None:
    """Equal rows; floats within 1e-5 (a record retried in a smaller batch runs in another
    compiled shape, whose float32 sums may differ in the last bits)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) or (isinstance(a[k], list) and a[k]
                                       and isinstance(a[k][0], float)):
            np.testing.assert_allclose(np.array(a[k], float), np.array(b[k], float),
                                       rtol=1e-5, atol=1e-5, err_msg=k)
        else:
            assert a[k] == b[k], k


def _run(tmp_path: Path, name: str, src: str, **options):
    config = JobConfig(input=src, output=str(tmp_path / name), progress=False,
                       id_field="id", **options)
    summary = jobs.run(config)
    return summary, {r["id"]: r for r in read_output(config.output)}, read_output(
        errors_path(config.output))


def test_score_batches_split_down_to_the_failing_records(tmp_path, tiny_checkpoint, poison):
    texts = _texts(24) + [" ".join(WORDS * 30)]  # the last one needs several windows
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                           for i, t in enumerate(texts)))
    _, clean, _ = _run(tmp_path, "clean", str(src), model=str(tiny_checkpoint))
    poison.bad = {f"{src}:3", f"{src}:17", f"{src}:24"}
    poison.oom = True
    summary, rows, errors = _run(tmp_path, "faulty", str(src), model=str(tiny_checkpoint))
    assert summary.reconciled
    assert set(rows) == set(clean) - {"r3", "r17", "r24"}
    for key, row in rows.items():
        _same(row, clean[key])  # untouched by the retries
    by_id = {e["id"]: e for e in errors}
    assert set(by_id) == {"r3", "r17", "r24"}
    assert by_id["r3"]["reason"] == "out of memory at 1 x 64 tokens"
    assert by_id["r24"]["reason"].startswith("window ") and "out of memory" in by_id["r24"][
        "reason"]
    assert max(poison.calls) > 1 and 1 in poison.calls  # a whole batch first, then down to one


def test_generate_samples_that_fail_alone_are_error_rows(tmp_path, tiny_checkpoint, poison):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                           for i, t in enumerate(_texts(6))))
    opts = dict(mode="generate", model=str(tiny_checkpoint), max_new_tokens=4)
    _, clean, _ = _run(tmp_path, "clean", str(src), **opts)
    poison.bad = {f"{src}:2"}
    summary, rows, errors = _run(tmp_path, "faulty", str(src), **opts)
    assert summary.reconciled and summary.error_records == 1
    assert set(rows) == set(clean) - {"p2"}
    for key, row in rows.items():
        _same(row, clean[key])
    (error,) = errors
    assert error["id"] == "p2"
    assert error["reason"].startswith("sample 0: model call failed at 1 x ")
    assert "injected XLA failure" in error["reason"]


def test_a_run_whose_every_model_call_fails_is_a_failed_job(tmp_path, tiny_checkpoint,
                                                           poison, monkeypatch):
    """Nothing succeeded in the model (a broken device or program): the records are all error
    rows, but the job fails (exit status 3 from the CLI) and marks nothing complete, so a
    --resume once the cause is gone redoes every item and equals a clean run."""
    from click.testing import CliRunner

    from pipeline import cli, resume

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                           for i, t in enumerate(_texts(6))))
    monkeypatch.setattr(handler, "FAULT_HOOK", lambda items, length: (_ for _ in ()).throw(
        RuntimeError("injected XLA failure")))
    out = tmp_path / "broken"
    got = CliRunner().invoke(cli.main, ["score", "--input", str(src), "--output", str(out),
                                        "--model", str(tiny_checkpoint), "--no-progress",
                                        "--id-field", "id"])
    assert got.exit_code == 3, got.output
    assert "no model call succeeded: 6 failed even for a single record" in got.output
    assert "injected XLA failure" in got.output
    assert not (out / "_SUCCESS").exists()
    assert len(read_output(errors_path(str(out)))) == 6  # nothing lost
    assert resume._committed(str(out)) == {}
    monkeypatch.setattr(handler, "FAULT_HOOK", None)
    summary, rows, errors = _run(tmp_path, "broken", str(src), model=str(tiny_checkpoint),
                                 resume=True)
    clean, clean_rows, _ = _run(tmp_path, "clean", str(src), model=str(tiny_checkpoint))
    assert errors == [] and summary.model_failures == 0 and summary.reused_records == 0
    assert rows.keys() == clean_rows.keys()
    for k in rows:
        _same(rows[k], clean_rows[k])
