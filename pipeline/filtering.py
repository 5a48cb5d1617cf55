"""The filter job: score a corpus and write its records back, unchanged, into buckets.

    thresholds, --thresholds-from:   read -> score -> route -> <output>/<bucket>/
    quantiles:  pass 1  read -> score -> <output>/_work/scored/ (the records with their scores)
                                     \\-> approximate quantiles (per group) -> _work/cuts
                pass 2  read _work/scored -> route by the cut points -> <output>/<bucket>/

The cut points of a quantile rule depend on the whole corpus, so the records cannot be routed
while they are scored; they go through files between the two passes (never through a runner's
memory), in the input's own format, and `_work/` is removed when the job has finished.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.stats import ApproximateQuantilesCombineFn

from pipeline import formats, metrics, output, progress, read, resume, writers
from pipeline.config import JobConfig
from pipeline.formats import InputError, detect_format
from pipeline.modes import filter as rules
from pipeline.records import ERRORS, error_row

WORK = "_work"


class _Route(beam.DoFn):
    """A row -> its bucket's tagged output, counted; errors counted and tagged `errors`."""

    def __init__(self, config: JobConfig, rule: rules.Rule, placed: bool = False):
        self.config = config
        self.rule = rule
        self.placed = placed  # rows as (source, index, row), for per-item output

    def setup(self) -> None:
        self.errors = metrics.counter(metrics.ERRORS)
        self.counts = {n: metrics.counter(metrics.bucket(n)) for n in self.rule.names}

    def _routed(self, name: str, row: dict):
        self.counts[name].inc()
        return beam.pvalue.TaggedOutput(name, row)

    def _error(self, row: dict):
        self.errors.inc()
        return beam.pvalue.TaggedOutput(ERRORS, row)


class RouteScored(_Route):
    """PartScores of a whole record -> its filter row, tagged with its bucket (or an error)."""

    def process(self, result):
        row = rules.row(result, self.config)
        meta = result.meta
        try:
            name = _bucket(self.rule, row, self.config)
        except KeyError:
            group = rules.group_of(row, self.config)
            yield self._error(error_row(
                meta.source, meta.index, meta.id,
                f"group {group!r} has no cut points in --thresholds-from", None))
            return
        yield self._routed(name, (meta.source, meta.index, row) if self.placed else row)


class RouteRows(_Route):
    """Pass 2: a scored record read back from `_work/scored` -> its bucket."""

    def process(self, rec):
        if rec.error is not None:  # our own intermediate file is damaged
            yield self._error(error_row(rec.source, rec.index, None,
                                        f"scored record unreadable: {rec.error}", rec.raw))
            return
        # Every group has cut points by now: they were computed from these very rows.
        yield self._routed(_bucket(self.rule, rec.value, self.config), rec.value)


class FilterRecords(beam.PTransform):
    """PCollection[SourceRecord] -> {'<bucket>': filter rows, ..., 'errors': error rows}.

    For rules whose cut points are known before the job (thresholds, --thresholds-from): the
    records are routed as they are scored. A quantile rule computes its cut points over the
    corpus first, which takes two passes through files: `pipeline.jobs.run` does that.
    """

    def __init__(self, config: JobConfig, context: int, total: int | None = None,
                 rule: rules.Rule | None = None, run_id: str | None = None,
                 total_bytes: int | None = None, placed: bool = False):
        """placed: as `pipeline.jobs.ScoreRecords`: placed rows, error outputs unflattened."""
        super().__init__()
        self.config = config
        self.placed = placed
        self.progress = dict(run_id=run_id, total_bytes=total_bytes)
        self.rule = rule or load_rule(config)
        if self.rule.needs_cut_points:
            raise ValueError("quantile buckets need the corpus' cut points first: run the "
                             "job with pipeline.jobs.run (two passes), or pass cut points")
        self.context = context
        self.total = total

    def expand(self, records):
        from pipeline.jobs import ScoreRecords  # the score job's front and model step

        joined, errors = ScoreRecords(self.config, self.context, self.total,
                                      **self.progress).joined(records)
        routed = joined | "Route" >> beam.ParDo(RouteScored(self.config, self.rule,
                                                            self.placed)) \
            .with_outputs(ERRORS, *self.rule.names)
        out = {name: routed[name] for name in self.rule.names}
        errors = [*errors, routed[ERRORS]]
        if self.placed:
            out.update({f"errors:{i}": e for i, e in enumerate(errors)})
        else:
            out["errors"] = tuple(errors) | "Errors" >> beam.Flatten()
        return out


def _bucket(rule: rules.Rule, row: dict, config: JobConfig) -> str:
    return rule.bucket(float(row[config.score_prefix + rule.by]),
                       rules.group_of(row, config))


def _group_value(row: dict, config: JobConfig) -> tuple[str | None, float]:
    return rules.group_of(row, config), float(row[config.score_prefix + config.by])


def _input_format(config: JobConfig, files: list[str]) -> str:
    names = {detect_format(f, config.input_format) for f in files}
    if len(names) != 1:
        raise InputError(f"a filter writes its input's format back, and the input mixes "
                         f"{', '.join(sorted(names))}; filter each format on its own")
    return names.pop()


def _input_schema(config: JobConfig, files: list[str], fmt: str) -> pa.Schema | None:
    """Parquet: the files' common schema; CSV/TSV: the header as strings; JSONL: None."""
    if fmt == "jsonl":
        return None
    schemas = {}
    for path in files:
        try:
            facts = formats.get(fmt).facts(path)
        except Exception:  # unreadable: its rows become error records
            continue
        if facts.columns:
            schemas[path] = pa.schema(list(facts.columns.items()))
    distinct = {str(s) for s in schemas.values()}
    if len(distinct) > 1:
        a, b = list(schemas)[:2]
        raise InputError(f"the input files have different columns ({a!r} and {b!r} differ); "
                         "a filter writes one schema back")
    return next(iter(schemas.values()), None)


def load_rule(config: JobConfig) -> rules.Rule:
    """The rule to apply: the config's, or the one an earlier filter recorded in `_SUCCESS`."""
    if not config.thresholds_from:
        return rules.rule_of(config)
    source = config.thresholds_from
    marker = FileSystems.join(source, output.SUCCESS_MARKER)
    try:
        with FileSystems.open(marker) as f:
            recorded = json.loads(f.read().decode("utf-8"))["filter"]["rule"]
        rule = rules.Rule.from_json(recorded)
    except Exception as err:
        raise InputError(f"--thresholds-from {source!r} is not the output of a finished filter "
                         f"job (no readable rule in its {output.SUCCESS_MARKER}: "
                         f"{type(err).__name__})") from None
    if rule.by != config.by:
        raise InputError(f"--thresholds-from {source!r} cut on {rule.by}; pass --by {rule.by}")
    if bool(rule.group_field) != bool(config.group_field):
        raise InputError(f"--thresholds-from {source!r} has cut points "
                         f"{'per ' + repr(rule.group_field) if rule.group_field else 'for all'}"
                         "; pass the same --group-field")
    return dataclasses.replace(rule, group_field=config.group_field or None)


def _write_buckets(routed, rule: rules.Rule, config: JobConfig, fmt: str,
                   schema: pa.Schema) -> None:
    for name in rule.names:
        routed[name] | f"Write_{name}" >> writers.write_results(
            FileSystems.join(config.output, name), fmt, schema)


def _cut_points(path: str, rule: rules.Rule) -> rules.Rule:
    """Pass 1's quantile grids -> the rule with cut points per group (sorted by group)."""
    found = FileSystems.match([FileSystems.join(path, "part-*")])
    cuts = []
    for m in (m for r in found for m in r.metadata_list):
        with FileSystems.open(m.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                group, grid = json.loads(line)
                cuts.append((group, rules.cut_points(grid, rule.quantiles)))
    cuts.sort(key=lambda gc: (gc[0] is not None, gc[0] or ""))
    return dataclasses.replace(rule, cut_points=tuple(cuts))


def run(config: JobConfig, beam_args: list[str] | None, model_config: Any,
        files: list[str], spec: resume.Spec, resumed: resume.Resumed
        ) -> tuple[metrics.JobSummary, rules.Rule]:
    """Run a validated filter job; returns its summary and the rule it applied.

    The pass through the model writes per work item (`pipeline.resume`), so `--resume` skips
    what an interrupted run scored: the buckets directly (thresholds), or `_work/scored`
    (quantiles; the cut points and the routing, which need no model, run again whole)."""
    from pipeline.jobs import ScoreRecords, write_placed  # the score job's parts
    from pipeline.jobs import _placed as jobs_placed

    fmt = _input_format(config, files)
    input_schema = _input_schema(config, files, fmt)
    schema = rules.schema(config, input_schema)  # refuses a column clash before any work
    rule = load_rule(config)
    total, _ = read.input_facts(files, config.input_format, [config.text_field])
    options = PipelineOptions(beam_args or [])
    from pipeline.jobs import _progress

    run_id, total_bytes = _progress(config, files)
    start = time.perf_counter()
    results = []
    score = ScoreRecords(config, context=model_config.n_positions, total=total, run_id=run_id,
                         total_bytes=total_bytes, placed=True)

    resumed.start()
    pipeline = beam.Pipeline(options=options)
    records = pipeline | "Read" >> read.ReadRecords(
        config.input, config.input_format, progress_id=run_id, ledger=spec,
        done=frozenset(resumed.done))
    scored_dir = FileSystems.join(config.output, WORK, "scored")
    if not rule.needs_cut_points:
        out = records | "Filter" >> FilterRecords(config, model_config.n_positions, total,
                                                  rule, run_id=run_id,
                                                  total_bytes=total_bytes, placed=True)
        targets = {name: resume.Target(FileSystems.join(config.output, name), fmt, schema,
                                       metrics.bucket(name), rules.tokens, config)
                   for name in rule.names}
    else:
        joined, errors = score.joined(records)
        out = {"scored": joined | "Format" >> beam.Map(jobs_placed(rules.row), config),
               **{f"errors:{i}": e for i, e in enumerate(errors)}}
        targets = {"scored": resume.Target(scored_dir, fmt, schema, None, rules.tokens, config)}
    written = write_placed(out, spec, targets)
    try:
        results.append(pipeline.run())
        results[-1].wait_until_finish()
    finally:
        resume.forget(spec)
    progress.finish(run_id)
    resume.finish(config.output, written)

    if rule.needs_cut_points:
        cuts = beam.Pipeline(options=options)
        (cuts
         | "ReadScored" >> read.ReadRecords(FileSystems.join(scored_dir, "part-*"), fmt,
                                            counted=False)
         | "Readable" >> beam.Filter(lambda rec: rec.error is None)  # RouteRows reports them
         | "GroupValue" >> beam.Map(lambda rec: _group_value(rec.value, config))
         | "Quantiles" >> beam.CombinePerKey(ApproximateQuantilesCombineFn.create(
             rules.QUANTILE_GRID + 1, epsilon=rules.QUANTILE_EPSILON))
         | "CutsJson" >> beam.MapTuple(lambda g, grid: json.dumps([g, grid]))
         | "WriteCuts" >> beam.io.WriteToText(FileSystems.join(config.output, WORK, "cuts",
                                                               "part")))
        cuts.run().wait_until_finish()
        rule = _cut_points(FileSystems.join(config.output, WORK, "cuts"), rule)
        second = beam.Pipeline(options=options)
        routed = (second
                  | "ReadScored" >> read.ReadRecords(
                      FileSystems.join(config.output, WORK, "scored", "part-*"), fmt,
                      counted=False)
                  | "Route" >> beam.ParDo(RouteRows(config, rule)).with_outputs(
                      ERRORS, *rule.names))
        _write_buckets(routed, rule, config, fmt, schema)
        routed[ERRORS] | "WriteErrors" >> writers.WriteErrors(config.output, "part-route")
        results.append(second.run())
        results[-1].wait_until_finish()
        work = FileSystems.join(config.output, WORK)
        leftovers = [m.path for r in FileSystems.match([FileSystems.join(work, "**")])
                     for m in r.metadata_list]
        if leftovers:
            FileSystems.delete(leftovers)
        if "://" not in work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    reused = resumed.counts
    if rule.needs_cut_points:  # pass 2 routed every record again, reused ones included
        reused = {k: v for k, v in reused.items() if not k.startswith(metrics.bucket(""))}
    summary = metrics.summarize(results, config.output, time.perf_counter() - start,
                                buckets=rule.names, reused=reused)
    return summary, rule
