"""--revision and the model record in `_SUCCESS`, through the real Hub client code path.

The Hub is unreachable here, so the test lays out a Hugging Face cache itself (what
`huggingface_hub` writes: models--org--name/refs/<branch>, snapshots/<commit>/<files>) with two
commits of a tiny checkpoint, and runs offline: `hf_hub_download` resolves branches and commits
from it exactly as it does after a real download.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from gpt2model.errors import CheckpointError
from pipeline import jobs
from pipeline.config import JobConfig

REPO_ID = "acme/tiny-gpt2"
OLD, NEW = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_checkpoint, monkeypatch):
    from conftest import TINY, write_hf_checkpoint
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-gpt2"
    other = write_hf_checkpoint(tmp_path / "other", seed=9, **TINY)
    for commit, source in ((OLD, Path(tiny_checkpoint)), (NEW, other)):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
            shutil.copy(source / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    (repo / "refs" / "v1").write_text(OLD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo


def _run(tmp_path, name, **options):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    config = JobConfig(input=str(src), output=str(tmp_path / name), model=REPO_ID,
                       progress=False, output_format="jsonl", **options)
    summary = jobs.run(config)
    marker = json.loads((tmp_path / name / "_SUCCESS").read_text())
    rows = [json.loads(x) for p in sorted((tmp_path / name).glob("part-*"))
            for x in p.read_text().splitlines()]
    return summary, marker, rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_revision_pins_the_commit_and_records_the_files(tmp_path, hub_cache):
    _, main, main_rows = _run(tmp_path, "main")
    _, tag, tag_rows = _run(tmp_path, "tag", revision="v1")
    _, sha, sha_rows = _run(tmp_path, "sha", revision=OLD)
    assert main["model"]["commit"] == NEW and main["job"]["model"] == f"{REPO_ID}@{NEW}"
    assert tag["model"]["commit"] == OLD and tag["model"]["revision"] == "v1"
    assert sha["model"]["commit"] == OLD
    snapshot = hub_cache / "snapshots" / OLD
    assert tag["model"]["files"] == {f: _sha(snapshot / f) for f in (
        "config.json", "model.safetensors", "vocab.json", "merges.txt")}
    # Different weights, different numbers; the same commit, the same numbers.
    assert tag_rows == sha_rows and tag_rows[0]["sum_logprob"] != main_rows[0]["sum_logprob"]


def test_unknown_revision_and_revision_of_a_local_model(tmp_path, hub_cache, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="acme/tiny-gpt2"):
        _run(tmp_path, "nope", revision="no-such-branch")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x y"}\n')
    with pytest.raises(ValueError, match="--revision applies to Hub models"):
        jobs.run(JobConfig(input=str(src), output=str(tmp_path / "local"),
                           model=str(tiny_checkpoint), revision="main", progress=False))
    summary = jobs.run(JobConfig(input=str(src), output=str(tmp_path / "local2"),
                                 model=str(tiny_checkpoint), progress=False))
    marker = json.loads((tmp_path / "local2" / "_SUCCESS").read_text())
    assert marker["model"]["commit"] is None
    assert marker["model"]["files"]["model.safetensors"] == _sha(
        Path(tiny_checkpoint) / "model.safetensors")
    assert summary.reconciled
