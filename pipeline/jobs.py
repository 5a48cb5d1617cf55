"""Each job mode as a PTransform other pipelines can embed, and `run()`, the whole job.

    records (SourceRecord) -> Parse -> Tokenize -> batch -> model step -> row builder -> rows
                                  \\--------\\---------- errors (tagged) ---------------------/

A mode's items, schema and row builder live in `pipeline.modes.<mode>`; this module wires them.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from gpt2model import GPT2Config
from pipeline import modes, output, progress, read, resume
from pipeline.config import JobConfig
from pipeline.handler import MODEL_CALL_FAILED, OUT_OF_MEMORY, GenerateBatches, ScoreBatches
from pipeline.metrics import ERRORS as ERRORS_METRIC
from pipeline.metrics import OUTPUT_ROWS, JobSummary, counter, summarize
from pipeline.modes import generate as generate_mode
from pipeline.modes import score as score_mode
from pipeline.records import EMPTY, ERRORS
from pipeline.transforms import (
    BucketBatch,
    PackBatch,
    ParseRecords,
    Tokenize,
    job_tokenizer,
    one_per_row,
)

__all__ = ["GenerateRecords", "JobSummary", "ScoreRecords", "filter", "generate", "output_schema",
           "run", "score"]


def output_schema(config: JobConfig, keep_types: dict[str, pa.DataType] | None = None
                  ) -> pa.Schema:
    """The explicit Arrow schema of a job's output (documented in the README)."""
    return modes.for_config(config).schema(config, keep_types)


def _stringify(row: dict, names: tuple[str, ...], types: dict[str, pa.DataType]) -> dict:
    """Kept fields without a known Arrow type (JSONL input) are stored as JSON text."""
    for name in names:
        if name not in types and row.get(name) is not None and not isinstance(row[name], str):
            row[name] = json.dumps(row[name], ensure_ascii=False)
    return row


_rows_counter = counter(OUTPUT_ROWS)


def _count_row(row: Any) -> Any:
    _rows_counter.inc()
    return row


def _placed(fn):
    """A row builder -> one that also says where the row's record came from, (source, index,
    row): what per-item output (`pipeline.resume`) files it by."""
    def build(result, *args):
        meta = getattr(result, "meta", result)
        return meta.source, meta.index, fn(result, *args)

    return build


def _placed_row(fn):
    """`fn` applied to the row of a placed (source, index, row) triple."""
    def apply(placed, *args):
        source, index, row = placed
        return source, index, fn(row, *args)

    return apply


class _Records(beam.PTransform):
    """Shared front and back: parse and tokenize with errors split off; count and type rows.

    context: the model's n_positions; total: input records when known (for the ETA);
    keep_types: Arrow types of kept fields (from Parquet footers, CSV headers).
    placed: for `run`'s per-item output: rows come out as (source, index, row), and each kind
    of row is its own output ('results', 'results:empty', 'errors:<n>'), never flattened (a
    Flatten would hold them all until every record is done, and no item could complete).
    """

    def __init__(self, config: JobConfig, context: int, total: int | None = None,
                 keep_types: dict[str, pa.DataType] | None = None, run_id: str | None = None,
                 total_bytes: int | None = None, placed: bool = False):
        super().__init__()
        self.config = config
        self.context = context
        self.total = total
        self.keep_types = keep_types or {}
        self.progress = dict(run_id=run_id, total_bytes=total_bytes)  # for the model step
        self.placed = placed

    def builder(self, fn):
        """A row builder as this transform emits rows: plain, or placed."""
        return _placed(fn) if self.placed else fn

    def front(self, records):
        parsed = records | "Parse" >> beam.ParDo(ParseRecords(self.config)).with_outputs(
            ERRORS, main="records")
        items = parsed.records | "Tokenize" >> beam.ParDo(Tokenize(self.config)).with_outputs(
            ERRORS, EMPTY, main="items")
        return items, [parsed[ERRORS], items[ERRORS]]

    def back(self, rows, errors, empty=None) -> dict[str, beam.PCollection]:
        cfg = self.config
        stringify = _placed_row(_stringify) if self.placed else _stringify
        out = {}
        for name, part in (("results", rows), ("results:empty", empty)):
            if part is not None:
                out[name] = (part
                             | f"Count{name[7:]}" >> beam.Map(_count_row)
                             | f"KeepTypes{name[7:]}" >> beam.Map(stringify, cfg.keep_fields,
                                                                  self.keep_types))
        if self.placed:
            out.update({f"errors:{i}": e for i, e in enumerate(errors)})
        else:
            if "results:empty" in out:
                # On the DirectRunner a Flatten is materialized (every row held in memory), so
                # the default path has none between reading and writing.
                out["results"] = ((out["results"], out.pop("results:empty"))
                                  | "Results" >> beam.Flatten())
            out["errors"] = tuple(errors) | "Errors" >> beam.Flatten()
        return out


class ScoreRecords(_Records):
    """PCollection[SourceRecord] -> {'results': score rows, 'errors': error rows}."""

    def joined(self, records) -> tuple[beam.PCollection, list]:
        """Records -> one PartScores per scored record (windows joined), and the error
        outputs so far; `expand` formats them, the filter job routes them."""
        cfg = self.config
        items, errors = self.front(records)
        self._items = items
        if cfg.pack:
            batches = items.items | "Pack" >> beam.ParDo(PackBatch(cfg, self.context))
        else:
            batches = (items.items
                       | "Batch" >> beam.ParDo(BucketBatch(cfg, self.context))
                       | "OnePerRow" >> beam.Map(one_per_row))
        scored = batches | "Score" >> beam.ParDo(ScoreBatches(cfg, shared.Shared(), self.total,
                                                              **self.progress))
        joined = scored | "JoinParts" >> beam.ParDo(score_mode.JoinParts()).with_outputs(
            ERRORS, main="joined")
        return joined.joined, [*errors, joined[ERRORS]]

    def expand(self, records):
        cfg = self.config
        joined, errors = self.joined(records)
        items = self._items
        rows = joined | "Format" >> beam.Map(self.builder(modes.for_config(cfg).row), cfg)
        empty = None
        if cfg.allow_empty:  # only then does Tokenize emit EMPTY items
            empty = items[EMPTY] | "FormatEmpty" >> beam.Map(self.builder(score_mode.empty_row),
                                                             cfg)
        return self.back(rows, errors, empty)


class GenerateRecords(_Records):
    """PCollection[SourceRecord] -> {'results': one row per sample, 'errors': error rows}."""

    def expand(self, records):
        cfg = self.config
        items, errors = self.front(records)
        generated = (items.items
                     | "Batch" >> beam.ParDo(BucketBatch(cfg, self.context, cfg.max_new_tokens,
                                                         generate_mode.stream_groups(cfg)))
                     | "Generate" >> beam.ParDo(GenerateBatches(cfg, shared.Shared(),
                                                                self.total, **self.progress))
                     .with_outputs(
                         ERRORS, main="generated"))
        rows = generated.generated | "Format" >> beam.MapTuple(
            self.builder(generate_mode.row))
        return self.back(rows, [*errors, generated[ERRORS]])


_TRANSFORMS = {"score": ScoreRecords, "generate": GenerateRecords}  # filter: pipeline.filtering


def score(config: JobConfig, **kwargs: Any) -> ScoreRecords:
    """The score job as a PTransform over SourceRecords (for embedding in other pipelines)."""
    return ScoreRecords(config.replace(mode="score"), **kwargs)


def generate(config: JobConfig, **kwargs: Any) -> GenerateRecords:
    """The generate job as a PTransform over SourceRecords."""
    return GenerateRecords(config.replace(mode="generate"), **kwargs)


def filter(config: JobConfig, **kwargs: Any) -> beam.PTransform:  # noqa: A001 (the mode's name)
    """The filter job's scoring and routing as a PTransform over SourceRecords, for a rule that
    needs no corpus-wide cut points (thresholds, or cut points from an earlier filter job):
    {'<bucket>': the input records with score columns appended, 'errors': error rows}.
    Quantile buckets need two passes through files: run them with `run`."""
    from pipeline import filtering

    return filtering.FilterRecords(config.replace(mode="filter"), **kwargs)


@dataclasses.dataclass
class _Checked:
    """A validated job: the config to run (model pinned), the model's config, the input
    files, what `_SUCCESS` records of the model, and what the output already holds."""

    config: JobConfig
    model_config: GPT2Config
    files: list[str]
    model_info: dict[str, Any]
    resumed: resume.Resumed


def _validate(config: JobConfig) -> _Checked:
    """Fail fast, before any work: input, model (pinned to a commit), output location (a
    `--resume` with other settings than the interrupted run's is refused here)."""
    if not config.input or not config.output:
        raise ValueError("both --input and --output are required")
    files = read.check_input(config.input, config.input_format)
    config, model_info = pin_model(config)
    from gpt2model import CheckpointError
    from gpt2model.weights import check_checkpoint

    try:
        model_config = GPT2Config.from_pretrained(config.model)
    except CheckpointError as err:  # "config.json: ..." alone would not say which checkpoint
        if str(err).startswith("config.json"):
            raise CheckpointError(f"{config.model}/{err}") from None
        raise
    # Every tensor's name, shape and byte range against config.json, from the safetensors
    # headers: a lying config or a truncated file stops the job here, not on a worker.
    check_checkpoint(config.model, model_config)
    tokenizer = job_tokenizer(config.model)
    if tokenizer.vocab_size > model_config.vocab_size:
        # Token ids past the embedding table would be clamped silently by the gather.
        raise CheckpointError(
            f"{config.model}: the tokenizer has {tokenizer.vocab_size} tokens but config.json "
            f"has vocab_size {model_config.vocab_size}; they are not from the same model")
    if config.mode == "generate":  # bad words tokenized, token ids checked
        config = generate_mode.prepare(config, tokenizer, model_config.vocab_size)
    output_schema(config)  # column clashes
    model_info = _model_files(config, model_info)
    resumed = resume.prepare(config.output, resume.settings_of(dataclasses.asdict(config),
                                                               model_info),
                             config.resume, config.overwrite, files)
    return _Checked(config, model_config, files, model_info, resumed)


def _required_fields(config: JobConfig) -> list[str]:
    """Input fields every record must have."""
    names = [config.source_field, config.context_field, config.id_field, config.choices_field,
             config.label_field]
    return [n for n in names if n]


def pin_model(config: JobConfig) -> tuple[JobConfig, dict[str, Any]]:
    """A Hub model pinned to the commit its revision resolves to, and what `_SUCCESS` records
    of the model: name, revision, commit, and the sha256 of every file the job reads."""
    from gpt2model import hub

    info: dict[str, Any] = {"name": config.model, "revision": config.revision, "commit": None}
    if hub.is_local(config.model):
        if config.revision:
            raise ValueError(f"--revision applies to Hub models; {config.model!r} is a local "
                             "directory")
    else:
        pinned, info["commit"] = hub.pin(config.model, config.revision)
        config = config.replace(model=pinned)
    return config, info


def _model_files(config: JobConfig, info: dict[str, Any]) -> dict[str, Any]:
    from gpt2model import hub

    return {**info, "files": hub.file_hashes(config.model)}


def run(config: JobConfig, beam_args: list[str] | None = None) -> JobSummary:
    """Validate, run the job on the configured Beam runner, wait, and summarise it.

    Output is written per input work item (`pipeline.resume`): with `config.resume` the items
    an interrupted run completed are kept and not read again."""
    checked = _validate(config)
    config, model_config, files = checked.config, checked.model_config, checked.files
    if checked.resumed.complete is not None:  # --resume of a job that had finished
        return _already_complete(checked.resumed.complete)
    rows_per_record = generate_mode.rows_per_record(config) if config.mode == "generate" else 1
    spec = resume.Spec(uuid.uuid4().hex, config.output, rows_per_record)
    if config.mode == "filter":
        from pipeline import filtering
        from pipeline.modes.filter import QUANTILE_ERROR

        summary, rule = filtering.run(config, beam_args, model_config, files, spec,
                                      checked.resumed)
        summary.filter = rule.to_json()
        return _finish(config, summary, checked.resumed.done, model=checked.model_info, filter={
            "rule": rule.to_json(), "buckets": summary.buckets,
            "quantile_rank_error": QUANTILE_ERROR if rule.quantiles else None})
    total, column_types = read.input_facts(files, config.input_format, _required_fields(config))
    keep_types = {n: column_types[n] for n in config.keep_fields if n in column_types}
    schema = output_schema(config, keep_types)
    options = PipelineOptions(beam_args or [])
    run_id, total_bytes = _progress(config, files)
    transform = _TRANSFORMS[config.mode](
        config, context=model_config.n_positions, total=total, keep_types=keep_types,
        run_id=run_id, total_bytes=total_bytes, placed=True)
    checked.resumed.start()
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    out = pipeline | "Read" >> read.ReadRecords(
        config.input, config.input_format, progress_id=run_id, ledger=spec,
        done=frozenset(checked.resumed.done)) | transform
    mode = modes.for_config(config)
    targets = write_placed(out, spec, {"results": resume.Target(
        config.output, config.output_format, schema, OUTPUT_ROWS, mode.tokens, config)})
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        resume.forget(spec)
    progress.finish(run_id)
    resume.finish(config.output, targets)
    summary = summarize(result, config.output, time.perf_counter() - start, rows_per_record,
                        reused=checked.resumed.counts)
    return _finish(config, summary, checked.resumed.done, model=checked.model_info)


def write_placed(out: dict[str, beam.PCollection], spec: resume.Spec,
                 targets: dict[str, resume.Target]) -> list[resume.Target]:
    """Attach a per-item writer to each placed output of a job: `targets` by output name
    ('results' also serves 'results:empty'), every 'errors:<n>' to the errors location."""
    errors = resume.Target(output.errors_path(spec.output), "jsonl", None, ERRORS_METRIC,
                           is_errors=True)
    used = []
    for name, rows in out.items():
        target = errors if name.startswith("errors:") else targets[name.split(":")[0]]
        rows | f"Write[{name}]" >> resume.WriteItems(spec, target)
        used.append(target)
    return used


def _first_model_failure(out: str) -> str:
    """The reason of one model-call error row of `out`, for the job's error line."""
    from apache_beam.io.filesystems import FileSystems

    for meta in FileSystems.match([FileSystems.join(output.errors_path(out), "part-*")])[
            0].metadata_list:
        with FileSystems.open(meta.path) as fh:
            for line in fh:
                reason = json.loads(line).get("reason", "")
                if MODEL_CALL_FAILED in reason or OUT_OF_MEMORY in reason:
                    return reason
    return "see the error rows"


def _already_complete(record: dict[str, Any]) -> JobSummary:
    known = {f.name for f in dataclasses.fields(JobSummary)}
    summary = JobSummary(**{k: v for k, v in record.items() if k in known})
    summary.reused_records, summary.reused_tokens = summary.input_records, summary.tokens
    return summary


def _progress(config: JobConfig, files: list[str]) -> tuple[str | None, int | None]:
    """A run id for the live progress (registered in this process) and the input's size."""
    if not config.progress:
        return None, None
    import uuid

    run_id, total_bytes = uuid.uuid4().hex, read.input_bytes(files)
    progress.register(run_id, total_bytes)
    return run_id, total_bytes


class ModelStepError(ValueError):
    """No model call of the run succeeded: a broken device or program, not bad records."""

    exit_code = 3


def _finish(config: JobConfig, summary: JobSummary, done: Iterable[str] = (),
            **extra: Any) -> JobSummary:
    """Write `_SUCCESS`: the summary's fields, the job's settings (`job`) and `extra`.

    Last, after every output is finalized: a killed or failed job leaves no marker. The
    settings let `gpt2-pipeline report` (and a person) see what produced the output.

    A run in which model calls failed and none succeeded is a failed job (ModelStepError),
    not a finished one: every record is still in the error rows, but the items this run
    completed (all but `done`, those an interrupted run had) lose their markers, so a
    `--resume` after the cause is fixed redoes them instead of keeping their error rows.
    """
    if summary.model_failures and not summary.batches:
        resume.unmark(config.output, keep=done)
        raise ModelStepError(
            f"no model call succeeded: {summary.model_failures} failed even for a single "
            f"record ({_first_model_failure(config.output)}); the error rows are in "
            f"{output.errors_path(config.output)} and nothing was marked complete: fix the "
            "cause and rerun with --resume (or --overwrite)")
    record = {**dataclasses.asdict(summary), "job": dataclasses.asdict(config), **extra}
    output.mark_complete(config.output, json.dumps(record) + "\n")
    resume.clear(config.output)
    if config.report:
        from pipeline.report import build_report

        build_report(config.output)
    return summary
