"""`--resume`: a job stopped part-way, rerun with resume, equals an uninterrupted run.

The stop is made in process here (fast, deterministic): the model step's test hook raises an
exception the split-and-retry logic does not catch after a seeded number of batches, which
fails the whole pipeline as a crash would. The real thing, SIGKILL of the CLI at random points,
is tests/reliability/test_resume_kill.py.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import handler, jobs
from pipeline.config import JobConfig
from pipeline.output import SUCCESS_MARKER, errors_path
from pipeline.resume import RESUME, ResumeMismatchError
from pipeline.writers import read_output

WORDS = ["river", "stone", "quiet", "market", "winter", "lantern", "orbit", "ember"]
COUNTS = ("input_records", "output_rows", "result_records", "error_records", "tokens",
          "labelled", "buckets")


class Stop(BaseException):
    """Not an Exception: the model step's retry logic lets it through, like a kill (Beam
    re-raises it wrapped in a RuntimeError)."""


def stopped():
    return pytest.raises(BaseException, match="stopped by the test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six JSONL files (two bad lines each) and a Parquet file of four row groups."""
    root = tmp_path_factory.mktemp("resume-in")
    rng = random.Random(7)
    for f in range(6):
        lines = [json.dumps({"id": f"j{f}-{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(
            2, 12))), "prompt": " ".join(rng.choices(WORDS, k=3)), "lang": "ab"[i % 2]})
            for i in range(10)]
        lines[3], lines[7] = '{"text": ', '{"id": "x", "text": 5}'
        (root / f"shard-{f}.jsonl").write_text("\n".join(lines) + "\n")
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(32)]
    table = pa.table({"id": [f"p{i}" for i in range(32)], "text": texts,
                      "prompt": [t[:12] for t in texts], "lang": ["ab"[i % 2] for i in range(32)]})
    pq.write_table(table, root / "rows.parquet", row_group_size=8)
    return root


@pytest.fixture
def stop_after(monkeypatch):
    """stop_after(out, k): the first model call after `k` work items of `out` are complete
    raises Stop (k None: never)."""
    def arm(out: str, k: int | None) -> None:
        items = Path(out) / RESUME / "items"

        def hook(batch, length):
            if k is not None and len(list(items.glob("*.json"))) >= k:
                raise Stop("stopped by the test")

        monkeypatch.setattr(handler, "FAULT_HOOK", hook)

    return arm


def _config(corpus: Path, out: Path, model: Path, pattern: str, **options) -> JobConfig:
    return JobConfig(input=str(corpus / pattern), output=str(out), model=str(model),
                     progress=False, id_field="id", max_tokens_per_batch=64,
                     bucket_boundaries=(16,), **options)


def _rows(out: Path) -> list[dict]:
    def key(r):
        return (str(r.get("id")), r.get("sample_index", 0), r.get("line", 0), str(r))
    return sorted(read_output(str(out)), key=key)


def _same_rows(got: list[dict], want: list[dict]) -> float:
    """Equal rows; returns the largest relative float difference (records batched with others
    than in the uninterrupted run may differ in float32's last bits)."""
    assert len(got) == len(want)
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            x, y = a[k], b[k]
            if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
                d = np.abs(np.array(x, float) - np.array(y, float)) / np.maximum(
                    np.abs(np.array(y, float)), 1e-6)
                worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
                np.testing.assert_allclose(np.array(x, float), np.array(y, float), rtol=1e-5,
                                           atol=1e-6, err_msg=k)
            else:
                assert x == y, (k, a, b)
    return worst


def _marker(out: Path) -> dict:
    return json.loads((out / SUCCESS_MARKER).read_text())


def _interrupted_then_resumed(tmp_path, cfg: JobConfig, stop_after, stops: list[int]):
    """Run `cfg` stopped once each count of complete items in `stops` is reached, resuming
    each time, then to the end. -> (summary of the last run, complete items after each stop)."""
    done = []
    for i, k in enumerate(stops):
        stop_after(cfg.output, k)
        try:
            summary = jobs.run(cfg.replace(resume=i > 0))
        except BaseException as err:  # noqa: BLE001 - Stop, wrapped by Beam
            assert "stopped by the test" in str(err)
        else:  # the items left completed without another model call
            assert i > 0, "the first run must be stopped"
            return summary, done
        assert not (Path(cfg.output) / SUCCESS_MARKER).exists()
        with pytest.raises(ValueError, match="interrupted|no output shards"):
            read_output(cfg.output)
        done.append(len(list((Path(cfg.output) / RESUME / "items").glob("*.json"))))
    stop_after(cfg.output, None)
    return jobs.run(cfg.replace(resume=True)), done


@pytest.mark.parametrize("mode, options, pattern", [
    ("score", {}, "*.jsonl"),
    ("score", dict(output_format="jsonl", keep_fields=("lang",)), "rows.parquet"),
    ("generate", dict(max_new_tokens=4, num_samples=2, temperature=1.0), "*"),
    ("filter", dict(max_value=1e9, min_value=0.0), "*.jsonl"),
    ("filter", dict(quantiles=(0.5,), group_field="lang"), "rows.parquet"),
])
def test_stopped_then_resumed_equals_uninterrupted(tmp_path, corpus, tiny_checkpoint,
                                                   stop_after, mode, options, pattern):
    cfg = _config(corpus, tmp_path / "ref", tiny_checkpoint, pattern, mode=mode, **options)
    stop_after(cfg.output, None)
    jobs.run(cfg)
    cfg = cfg.replace(output=str(tmp_path / "out"))
    rng = random.Random(zlib.crc32(f"{mode} {pattern} {options}".encode()))
    # Seeded stop points: once 1 or 2 items are complete, then (resumed) one or two more.
    first = rng.randint(1, 2)
    summary, done = _interrupted_then_resumed(tmp_path, cfg, stop_after,
                                              [first, first + rng.randint(1, 2)])
    out, ref_out = Path(cfg.output), tmp_path / "ref"
    buckets = [p.name for p in ref_out.iterdir() if p.is_dir()] if mode == "filter" else [""]
    diff = 0.0
    for b in buckets:
        diff = max(diff, _same_rows(_rows(out / b), _rows(ref_out / b)))
    _same_rows(_rows(Path(errors_path(str(out)))), _rows(Path(errors_path(str(ref_out)))))
    got, want = _marker(out), _marker(ref_out)
    assert {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}
    assert summary.reconciled
    assert 0 < summary.reused_records < summary.input_records
    assert got["reused_records"] == summary.reused_records
    assert done == sorted(done) and done[-1] > 0  # each resume kept what was finished
    assert not (out / RESUME).exists()
    print(f"\n[resume] {mode} {pattern}: reused {summary.reused_records} of "
          f"{summary.input_records} records; largest relative float difference {diff:.2e}")


def test_resume_with_other_settings_is_refused(tmp_path, corpus, tiny_checkpoint, stop_after):
    cfg = _config(corpus, tmp_path / "out", tiny_checkpoint, "*.jsonl")
    stop_after(cfg.output, 2)
    with stopped():
        jobs.run(cfg)
    assert list((tmp_path / "out" / RESUME / "items").glob("*.json"))
    stop_after(cfg.output, None)
    for change, named in ((dict(add_bos=False), "--add-bos"), (dict(stride=8), "--stride"),
                          (dict(dtype="bfloat16"), "--dtype"),
                          (dict(input=str(corpus / "shard-1.jsonl")), "--input")):
        with pytest.raises(ResumeMismatchError, match=named):
            jobs.run(cfg.replace(resume=True, **change))
    with pytest.raises(ValueError, match="pass one of them"):
        jobs.run(cfg.replace(resume=True, overwrite=True))
    # Operational settings may differ: progress, report, the batch budget (its default is
    # the backend's, so a run interrupted at an explicit budget resumes at the default).
    summary = jobs.run(cfg.replace(resume=True, report=True, max_tokens_per_batch=None))
    assert summary.reused_records > 0 and (tmp_path / "out" / "report.html").exists()


def test_resume_of_a_finished_job_reuses_everything(tmp_path, corpus, tiny_checkpoint):
    cfg = _config(corpus, tmp_path / "out", tiny_checkpoint, "rows.parquet")
    first = jobs.run(cfg)
    rows = _rows(Path(cfg.output))
    again = jobs.run(cfg.replace(resume=True))
    assert again.reused_records == again.input_records == first.input_records
    assert _rows(Path(cfg.output)) == rows
    with pytest.raises(ResumeMismatchError, match="--text-field"):
        jobs.run(cfg.replace(resume=True, text_field="prompt"))


def test_resume_refuses_output_it_did_not_write(tmp_path, corpus, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000-of-00001.parquet").write_bytes(b"someone else's")
    cfg = _config(corpus, out, tiny_checkpoint, "rows.parquet")
    with pytest.raises(ValueError, match="no resume state"):
        jobs.run(cfg.replace(resume=True))
    # --resume of an empty location just runs.
    summary = jobs.run(cfg.replace(output=str(tmp_path / "new"), resume=True))
    assert summary.reused_records == 0 and summary.reconciled


def test_output_is_one_file_per_work_item(tmp_path, corpus, tiny_checkpoint):
    cfg = _config(corpus, tmp_path / "out", tiny_checkpoint, "*")
    jobs.run(cfg)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names[0] == SUCCESS_MARKER
    parts = names[1:]
    assert len(parts) == 6 + 4  # six JSONL files, four row groups
    assert all(n.startswith("part-shard-") or "-rg0000" in n for n in parts)
    errors = sorted(p.name for p in Path(errors_path(cfg.output)).iterdir())
    assert len(errors) == 6 and all(n.startswith("part-shard-") for n in errors)
