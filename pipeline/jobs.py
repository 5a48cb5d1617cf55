"""Score and generate jobs: as PTransforms other pipelines can embed, and as `run()` entry points.

    records (SourceRecord) -> Parse -> Tokenize -> BucketBatch -> model step -> assemble -> rows
                                  \\--------\\---------- errors (tagged) ---------------------/
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from gpt2model import GPT2Config
from gpt2model.hub import resolve_file
from pipeline import io
from pipeline.config import JobConfig
from pipeline.handler import GenerateBatches, ScoreBatches
from pipeline.transforms import (
    EMPTY,
    ERRORS,
    NAMESPACE,
    BucketBatch,
    ParseRecords,
    Tokenize,
    counter,
    empty_row,
    merge_parts,
    score_row,
)

SCORE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("num_tokens", pa.int32()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("sum_logprob", pa.float64()),
    pa.field("mean_logprob", pa.float64()),
    pa.field("perplexity", pa.float64()),
    pa.field("bits_per_byte", pa.float64()),
    pa.field("greedy", pa.list_(pa.bool_())),
]
GENERATE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("sample_index", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("finish_reason", pa.string()),
]


def output_schema(config: JobConfig, keep_types: dict[str, pa.DataType] | None = None
                  ) -> pa.Schema:
    """The explicit Arrow schema of a job's output (documented in the README)."""
    fields = list(GENERATE_FIELDS if config.mode == "generate" else SCORE_FIELDS)
    if config.mode == "score" and config.context_field:
        fields.append(pa.field("is_greedy", pa.bool_()))
    taken = {f.name for f in fields}
    for name in config.keep_fields:
        if name in taken:
            raise ValueError(f"--keep-fields {name!r} clashes with an output column")
        fields.append(pa.field(name, (keep_types or {}).get(name, pa.string())))
    return pa.schema(fields)


def _stringify(row: dict, names: tuple[str, ...], types: dict[str, pa.DataType]) -> dict:
    """Kept fields without a known Arrow type (JSONL input) are stored as JSON text."""
    import json

    for name in names:
        if name not in types and row.get(name) is not None and not isinstance(row[name], str):
            row[name] = json.dumps(row[name], ensure_ascii=False)
    return row


class _Records(beam.PTransform):
    """Shared front: parse and tokenize, with errors split off."""

    def __init__(self, config: JobConfig):
        super().__init__()
        self.config = config

    def front(self, records):
        parsed = records | "Parse" >> beam.ParDo(ParseRecords(self.config)).with_outputs(
            ERRORS, main="records")
        items = parsed.records | "Tokenize" >> beam.ParDo(Tokenize(self.config)).with_outputs(
            ERRORS, EMPTY, main="items")
        return items, [parsed[ERRORS], items[ERRORS]]


class ScoreRecords(_Records):
    """PCollection[SourceRecord] -> {'results': score rows, 'errors': error rows}."""

    def __init__(self, config: JobConfig, context: int, total: int | None = None,
                 keep_types: dict[str, pa.DataType] | None = None):
        super().__init__(config)
        self.context = context
        self.total = total
        self.keep_types = keep_types or {}

    def expand(self, records):
        cfg = self.config
        items, errors = self.front(records)
        scored = (items.items
                  | "Batch" >> beam.ParDo(BucketBatch(cfg, self.context))
                  | "Score" >> beam.ParDo(ScoreBatches(cfg, shared.Shared(), self.total)))
        single = scored | "SingleWindow" >> beam.Filter(lambda r: r.parts == 1)
        merged = (scored
                  | "MultiWindow" >> beam.Filter(lambda r: r.parts > 1)
                  | "KeyByRecord" >> beam.Map(lambda r: (r.key, r))
                  | "GroupWindows" >> beam.GroupByKey()
                  | "MergeWindows" >> beam.Map(merge_parts))
        rows = ((single, merged) | "Assembled" >> beam.Flatten()
                | "Format" >> beam.Map(score_row, cfg))
        empty = items[EMPTY] | "FormatEmpty" >> beam.Map(empty_row, cfg)
        results = ((rows, empty) | "Results" >> beam.Flatten()
                   | "Count" >> beam.Map(_count_row)
                   | "KeepTypes" >> beam.Map(_stringify, cfg.keep_fields, self.keep_types))
        return {"results": results, "errors": tuple(errors) | "Errors" >> beam.Flatten()}


class GenerateRecords(_Records):
    """PCollection[SourceRecord] -> {'results': one row per sample, 'errors': error rows}."""

    def __init__(self, config: JobConfig, context: int, total: int | None = None,
                 keep_types: dict[str, pa.DataType] | None = None):
        super().__init__(config)
        self.context = context
        self.total = total
        self.keep_types = keep_types or {}

    def expand(self, records):
        cfg = self.config
        items, errors = self.front(records)
        results = (items.items
                   | "Batch" >> beam.ParDo(BucketBatch(cfg, self.context, cfg.max_new_tokens))
                   | "Generate" >> beam.ParDo(GenerateBatches(cfg, shared.Shared(), self.total))
                   | "Count" >> beam.Map(_count_row)
                   | "KeepTypes" >> beam.Map(_stringify, cfg.keep_fields, self.keep_types))
        return {"results": results, "errors": tuple(errors) | "Errors" >> beam.Flatten()}


_rows_counter = counter("output_rows")


def _count_row(row: dict) -> dict:
    _rows_counter.inc()
    return row


def score(config: JobConfig, **kwargs: Any) -> ScoreRecords:
    """The score job as a PTransform over SourceRecords (for embedding in other pipelines)."""
    return ScoreRecords(config.replace(mode="score"), **kwargs)


def generate(config: JobConfig, **kwargs: Any) -> GenerateRecords:
    """The generate job as a PTransform over SourceRecords."""
    return GenerateRecords(config.replace(mode="generate"), **kwargs)


@dataclasses.dataclass
class JobSummary:
    """What a finished job did; input records = result records + error records must hold."""

    input_records: int
    output_rows: int
    result_records: int
    error_records: int
    tokens: int
    padded_tokens: int
    batches: int
    compiles: int
    seconds: float
    output: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def reconciled(self) -> bool:
        return self.input_records == self.result_records + self.error_records

    def line(self) -> str:
        check = "ok" if self.reconciled else "MISMATCH"
        return (f"{self.input_records} records in: {self.result_records} done "
                f"({self.output_rows} rows), {self.error_records} errors [{check}]; "
                f"{self.tokens} tokens in {self.seconds:.1f}s ({self.tokens_per_second:,.0f} "
                f"tokens/s), {self.batches} batches, {self.compiles} compiles; "
                f"output {self.output}")


def _validate(config: JobConfig) -> tuple[GPT2Config, list[str]]:
    """Fail fast, before any work: input, model, output location."""
    if not config.input or not config.output:
        raise ValueError("both --input and --output are required")
    files = io.check_input(config.input, config.input_format)
    model_config = GPT2Config.from_pretrained(config.model)
    for name in ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack"):
        if resolve_file(config.model, name, required=False) is not None:
            break
    else:
        from gpt2model.weights import checkpoint_tensors

        next(iter(checkpoint_tensors(config.model)))  # raises the precise CheckpointError
    from gpt2model import get_tokenizer

    get_tokenizer(config.model)
    output_schema(config)  # column clashes
    io.prepare_output(config.output, config.overwrite)
    return model_config, files


def _input_facts(config: JobConfig, files: list[str]) -> tuple[int | None, dict]:
    """(total records when cheaply known, Arrow types of kept fields) from Parquet footers."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    if any(io.detect_format(f, config.input_format) != "parquet" for f in files):
        return None, {}
    total, types = 0, {}
    for path in files:
        try:
            with FileSystems.open(path) as fh:
                pf = pq.ParquetFile(fh)
                total += pf.metadata.num_rows
                schema = pf.schema_arrow
        except Exception:  # a corrupt file becomes an error record during the run
            return None, types
        for name in config.keep_fields:
            if name in schema.names and name not in types:
                types[name] = schema.field(name).type
    return total, types


def run(config: JobConfig, beam_args: list[str] | None = None) -> JobSummary:
    """Validate, run the job on the configured Beam runner, wait, and summarise it."""
    model_config, files = _validate(config)
    total, keep_types = _input_facts(config, files)
    schema = output_schema(config, keep_types)
    options = PipelineOptions(beam_args or [])
    transform = (score if config.mode == "score" else generate)(
        config, context=model_config.n_positions, total=total, keep_types=keep_types)
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    out = pipeline | "Read" >> io.ReadRecords(config.input, config.input_format) | transform
    if config.output_format == "parquet":
        out["results"] | "WriteResults" >> io.WriteParquet(config.output, schema)
    else:
        out["results"] | "WriteResults" >> io.WriteJsonl(config.output)
    out["errors"] | "WriteErrors" >> io.WriteErrors(config.output)
    result = pipeline.run()
    result.wait_until_finish()
    summary = summarize(result, config, time.perf_counter() - start)
    if config.progress:
        sys.stderr.write("\n")
    return summary


def summarize(result: Any, config: JobConfig, seconds: float) -> JobSummary:
    """Read the job's Beam counters back into a JobSummary."""
    counters = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
            c.committed if c.committed is not None else c.attempted)
    rows = counters.get("output_rows", 0)
    done = rows // config.num_samples if config.mode == "generate" else rows
    return JobSummary(
        input_records=counters.get("records_read", 0) + counters.get("read_errors", 0),
        output_rows=rows, result_records=done,
        error_records=counters.get("errors", 0),
        tokens=counters.get("tokens", 0), padded_tokens=counters.get("padded_tokens", 0),
        batches=counters.get("batches", 0), compiles=counters.get("compiles", 0),
        seconds=seconds, output=config.output)
