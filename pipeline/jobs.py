"""Score and generate jobs: as PTransforms other pipelines can embed, and as `run()` entry points.

    records (SourceRecord) -> Parse -> Tokenize -> BucketBatch -> model step -> assemble -> rows
                                  \\--------\\---------- errors (tagged) ---------------------/
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from gpt2model import GPT2Config
from pipeline import io
from pipeline.config import JobConfig
from pipeline.handler import GenerateBatches, ScoreBatches
from pipeline.transforms import (
    EMPTY,
    ERRORS,
    NAMESPACE,
    BucketBatch,
    MergeWindows,
    PackBatch,
    ParseRecords,
    Tokenize,
    counter,
    empty_row,
    one_per_row,
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
    """Shared front: parse and tokenize, with errors split off.

    context: the model's n_positions; total: input records when known (for the ETA);
    keep_types: Arrow types of kept fields (from Parquet footers).
    """

    def __init__(self, config: JobConfig, context: int, total: int | None = None,
                 keep_types: dict[str, pa.DataType] | None = None):
        super().__init__()
        self.config = config
        self.context = context
        self.total = total
        self.keep_types = keep_types or {}

    def front(self, records):
        parsed = records | "Parse" >> beam.ParDo(ParseRecords(self.config)).with_outputs(
            ERRORS, main="records")
        items = parsed.records | "Tokenize" >> beam.ParDo(Tokenize(self.config)).with_outputs(
            ERRORS, EMPTY, main="items")
        return items, [parsed[ERRORS], items[ERRORS]]


class ScoreRecords(_Records):
    """PCollection[SourceRecord] -> {'results': score rows, 'errors': error rows}."""

    def expand(self, records):
        cfg = self.config
        items, errors = self.front(records)
        if cfg.pack:
            batches = items.items | "Pack" >> beam.ParDo(PackBatch(cfg, self.context))
        else:
            batches = (items.items
                       | "Batch" >> beam.ParDo(BucketBatch(cfg, self.context))
                       | "OnePerRow" >> beam.Map(one_per_row))
        scored = batches | "Score" >> beam.ParDo(ScoreBatches(cfg, shared.Shared(), self.total))
        rows = (scored
                | "MergeWindows" >> beam.ParDo(MergeWindows())
                | "Format" >> beam.Map(score_row, cfg))
        if cfg.allow_empty:  # only then does Tokenize emit EMPTY items
            # On the DirectRunner a Flatten is materialized (every row held in memory), so the
            # default path has none between reading and writing.
            empty = items[EMPTY] | "FormatEmpty" >> beam.Map(empty_row, cfg)
            rows = (rows, empty) | "Results" >> beam.Flatten()
        results = (rows
                   | "Count" >> beam.Map(_count_row)
                   | "KeepTypes" >> beam.Map(_stringify, cfg.keep_fields, self.keep_types))
        return {"results": results, "errors": tuple(errors) | "Errors" >> beam.Flatten()}


class GenerateRecords(_Records):
    """PCollection[SourceRecord] -> {'results': one row per sample, 'errors': error rows}."""

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
    padded_tokens: int  # token slots the model computed, padding included
    batches: int
    compiles: int
    seconds: float
    output: str

    input_tokens: int = 0  # real tokens fed to the model (score jobs)
    model_seconds: float = 0.0  # summed model-step latency, compiles included: the rest of
    # `seconds` is reading, tokenizing, batching, writing and Beam's own overhead

    @property
    def padding_efficiency(self) -> float | None:
        """Real tokens / computed token slots of the score batches (1.0 = no padding)."""
        if not (self.input_tokens and self.padded_tokens):
            return None  # generate jobs do not count input tokens
        return self.input_tokens / self.padded_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def reconciled(self) -> bool:
        return self.input_records == self.result_records + self.error_records

    def line(self) -> str:
        check = "ok" if self.reconciled else "MISMATCH"
        eff = self.padding_efficiency
        pad = f" ({eff:.0%} real tokens)" if eff is not None else ""
        return (f"{self.input_records} records in: {self.result_records} done "
                f"({self.output_rows} rows), {self.error_records} errors [{check}]; "
                f"{self.tokens} tokens in {self.seconds:.1f}s ({self.tokens_per_second:,.0f} "
                f"tokens/s), {self.batches} batches{pad}, {self.compiles} compiles; "
                f"output {self.output}")


def _validate(config: JobConfig) -> tuple[GPT2Config, list[str]]:
    """Fail fast, before any work: input, model, output location."""
    if not config.input or not config.output:
        raise ValueError("both --input and --output are required")
    files = io.check_input(config.input, config.input_format)
    from gpt2model import CheckpointError, get_tokenizer
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
    tokenizer = get_tokenizer(config.model)
    if tokenizer.vocab_size > model_config.vocab_size:
        # Token ids past the embedding table would be clamped silently by the gather.
        raise CheckpointError(
            f"{config.model}: the tokenizer has {tokenizer.vocab_size} tokens but config.json "
            f"has vocab_size {model_config.vocab_size}; they are not from the same model")
    output_schema(config)  # column clashes
    io.prepare_output(config.output, config.overwrite, inputs=files)
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
    # Last, after both outputs are finalized: a killed or failed job leaves no marker.
    io.mark_complete(config.output, json.dumps(dataclasses.asdict(summary)) + "\n")
    if config.progress:
        sys.stderr.write("\n")
    return summary


def summarize(result: Any, config: JobConfig, seconds: float) -> JobSummary:
    """Read the job's Beam counters back into a JobSummary."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {}
    for c in metrics["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
            c.committed if c.committed is not None else c.attempted)
    latency_ms = sum(d.committed.sum if d.committed is not None else d.attempted.sum
                     for d in metrics["distributions"]
                     if d.key.metric.name == "batch_latency_ms")
    rows = counters.get("output_rows", 0)
    done = rows // config.num_samples if config.mode == "generate" else rows
    return JobSummary(
        input_records=counters.get("records_read", 0) + counters.get("read_errors", 0),
        output_rows=rows, result_records=done,
        error_records=counters.get("errors", 0),
        tokens=counters.get("tokens", 0), padded_tokens=counters.get("padded_tokens", 0),
        input_tokens=counters.get("input_tokens", 0),
        batches=counters.get("batches", 0), compiles=counters.get("compiles", 0),
        seconds=seconds, output=config.output, model_seconds=latency_ms / 1000)
