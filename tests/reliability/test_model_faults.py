"""Model loading under faults, through the CLI: one line naming the file and the problem, exit
status 2, before any data is read and before anything is written under the output location.

tests/gpt2model/test_weights.py checks the loader's exceptions one by one; here each fault goes
through `gpt2-pipeline score` (click's real error path; Beam's pipeline construction is made to
fail loudly, so a check that only fired on a worker would show), and a real subprocess shows
the whole of stderr is that one line. Nothing is ever unpickled: a pickle whose loading would
write a marker file is offered as the only weights.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, write_hf_checkpoint
from rel_helpers import error_lines, run_cli

from pipeline import cli
from pipeline.output import errors_path
from pipeline.read import ReadRecords


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _truncate(directory: Path, keep: float | int) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])


def _corrupt_header(directory: Path) -> None:
    """A header that is valid JSON but not a safetensors header (offsets are a string)."""
    path = directory / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = "0-100"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


class _Payload:
    """Unpickling this runs code that writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _small_vocab_checkpoint(directory: Path) -> None:
    """A consistent checkpoint (config = weights) with 1000 tokens, but GPT-2's 50257-token
    vocabulary files: ids past 999 would be clamped silently by the embedding gather."""
    write_hf_checkpoint(directory, **{**TINY, "vocab_size": 1000})


# name -> (how to break a copy of the tiny checkpoint, words the one error line must hold)
FAULTS = {
    "truncated-header": (lambda d, ck: _truncate(d, 5), ["model.safetensors", "truncated"]),
    "truncated-early": (lambda d, ck: _truncate(d, 0.05), ["model.safetensors", "truncated"]),
    "truncated-half": (lambda d, ck: _truncate(d, 0.5), ["model.safetensors", "truncated"]),
    "truncated-last-byte": (lambda d, ck: _truncate(d, -1), ["model.safetensors", "truncated"]),
    "corrupt-header": (lambda d, ck: _corrupt_header(d), ["model.safetensors", "corrupt"]),
    "config-lies-width": (lambda d, ck: _edit_config(d, n_embd=64),
                          ["config.json", "shape", "implies"]),
    "config-lies-context": (lambda d, ck: _edit_config(d, n_positions=128),
                            ["config.json", "wpe", "[128, 32]"]),
    "config-lies-layers": (lambda d, ck: _edit_config(d, n_layer=3), ["lacks", "h_2"]),
    "config-lies-fewer-layers": (lambda d, ck: _edit_config(d, n_layer=1),
                                 ["unexpected tensor", "h.1"]),
    "tokenizer-bigger-than-model": (lambda d, ck: _small_vocab_checkpoint(d),
                                    ["tokenizer", "50257", "vocab_size 1000"]),
    "not-gpt2": (lambda d, ck: _edit_config(d, model_type="llama"),
                 ["config.json", "'llama'", "gpt2"]),
    "config-not-json": (lambda d, ck: (d / "config.json").write_text("{not json"),
                        ["config.json", "not a readable JSON"]),
    "no-weights": (lambda d, ck: (d / "model.safetensors").unlink(),
                   ["no weights", "model.safetensors"]),
}


@pytest.fixture
def no_pipeline(monkeypatch):
    """Building the Beam pipeline (hence reading any record) fails the test."""

    def refuse(self, pbegin):
        raise AssertionError("the pipeline was built: data would have been read")

    monkeypatch.setattr(ReadRecords, "expand", refuse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faults-in") / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(5)))
    return str(path)


def _score(corpus: str, model: str, output: Path, *extra: str):
    return CliRunner().invoke(cli.main, ["score", "--input", corpus, "--output", str(output),
                                         "--model", model, "--no-progress", *extra],
                              prog_name="gpt2-pipeline")


def _assert_refused(result, output: Path, words: list[str]) -> str:
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and result.stderr.strip() == lines[0], result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not output.exists() and not Path(errors_path(str(output))).exists()
    return lines[0]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_broken_checkpoint_is_one_line_before_any_data(fault, tiny_checkpoint, corpus, tmp_path,
                                                       no_pipeline):
    model = tmp_path / "model"
    if fault != "tokenizer-bigger-than-model":
        _copy(tiny_checkpoint, model)
    FAULTS[fault][0](model, tiny_checkpoint)
    output = tmp_path / "out"
    line = _assert_refused(_score(corpus, str(model), output), output, FAULTS[fault][1])
    assert str(model) in line  # which checkpoint


def test_pickled_only_checkpoint_is_never_unpickled(tiny_checkpoint, corpus, tmp_path,
                                                    no_pipeline):
    marker = tmp_path / "UNPICKLED"
    model = _copy(tiny_checkpoint, tmp_path / "model", skip=("model.safetensors",))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    output = tmp_path / "out"
    line = _assert_refused(_score(corpus, str(model), output), output,
                           ["pytorch_model.bin", "never", "safetensors"])
    assert str(model) in line
    assert not marker.exists()
    # Next to valid safetensors the pickle is ignored, never opened.
    shutil.copy(tiny_checkpoint / "model.safetensors", model)
    from gpt2model.weights import check_checkpoint, load_params

    check_checkpoint(str(model))
    assert load_params(str(model))
    assert not marker.exists()


def test_missing_model_path(corpus, tmp_path, no_pipeline):
    output = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    line = _assert_refused(_score(corpus, str(missing), output), output, ["does not exist"])
    assert str(missing) in line and "make-checkpoint" in line  # names the offline route


def test_hub_id_without_network(corpus, tmp_path, monkeypatch, no_pipeline):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    output = tmp_path / "out"
    line = _assert_refused(_score(corpus, "openai-community/gpt2", output), output,
                           ["config.json", "'openai-community/gpt2'", "HF_HUB_OFFLINE"])
    assert "make-checkpoint" in line


def test_real_process_prints_only_the_line(tiny_checkpoint, corpus, tmp_path):
    """The real console script: the whole of stderr is one line, exit status 2, no output."""
    liar = _copy(tiny_checkpoint, tmp_path / "liar")
    _edit_config(liar, n_embd=64)
    for model, words in ((str(liar), ["config.json", "implies"]),
                         (str(tmp_path / "missing"), ["does not exist"])):
        output = tmp_path / "out"
        proc = run_cli("score", "--input", corpus, "--output", str(output), "--model", model,
                       timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        for word in words:
            assert word in proc.stderr
        assert not output.exists() and not Path(errors_path(str(output))).exists()
