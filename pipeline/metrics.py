"""Metric names and the job summary read back from Beam's counters.

Every counter and distribution the job reports is named here once; steps ask for them with
`counter(NAME)` / `distribution(NAME)`, and `summarize` reads the same names back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

NAMESPACE = "gpt2pipeline"

RECORDS_READ = "records_read"  # input records parsed
READ_ERRORS = "read_errors"  # input records (or whole files) that could not be parsed
ERRORS = "errors"  # records sent to the errors output, read errors included
OUTPUT_ROWS = "output_rows"  # result rows written (generate: one per sample)
TOKENS = "tokens"  # tokens scored or generated
INPUT_TOKENS = "input_tokens"  # real tokens fed to the model (score)
PADDED_TOKENS = "padded_tokens"  # token slots the model computed, padding included
BATCHES = "batches"  # model calls that succeeded
MODEL_FAILURES = "model_failures"  # model calls that failed even for one item (error rows)
COMPILES = "compiles"
MODEL_LOAD_MS = "model_load_ms"  # distribution: one value per model load
BATCH_LATENCY_MS = "batch_latency_ms"  # distribution: one value per model call
REREAD_RECORDS = "reread_records"  # a job's own intermediate records read again (filter)
REREAD_ERRORS = "reread_errors"
LABELLED = "labelled"  # multiple choice: records with a label
CORRECT = "correct"  # ... whose pred is the label (lm-eval's acc)
CORRECT_NORM = "correct_norm"  # ... whose pred_norm is the label (acc_norm)


def bucket(name: str) -> str:
    """The counter of a filter bucket's records."""
    return f"bucket:{name}"


def counter(name: str) -> Any:
    """A Beam counter of this job's namespace."""
    return Metrics.counter(NAMESPACE, name)


def distribution(name: str) -> Any:
    """A Beam distribution of this job's namespace."""
    return Metrics.distribution(NAMESPACE, name)


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
    labelled: int = 0  # multiple choice with a label field: records scored against a label
    accuracy: float | None = None  # of the labelled records: pred == label (lm-eval's acc)
    accuracy_norm: float | None = None  # pred_norm == label (lm-eval's acc_norm)
    buckets: dict[str, int] | None = None  # filter: records per bucket
    filter: dict[str, Any] | None = None  # filter: the rule applied (cut points included)
    model_load_seconds: float = 0.0  # loading the checkpoint onto the devices, every worker
    reused_records: int = 0  # --resume: input records whose rows an interrupted run wrote
    reused_tokens: int = 0  # ... and their tokens (counted in `tokens`, not in tokens/s)
    model_failures: int = 0  # this run's model calls that failed even for a lone item

    @property
    def padding_efficiency(self) -> float | None:
        """Real tokens / computed token slots of the score batches (1.0 = no padding)."""
        if not (self.input_tokens and self.padded_tokens):
            return None  # generate jobs do not count input tokens
        return self.input_tokens / self.padded_tokens

    @property
    def tokens_per_second(self) -> float:
        """Of this run's own work: a resumed run's reused tokens took no time here."""
        return (self.tokens - self.reused_tokens) / self.seconds if self.seconds else 0.0

    @property
    def reconciled(self) -> bool:
        return self.input_records == self.result_records + self.error_records

    def line(self) -> str:
        check = "ok" if self.reconciled else "MISMATCH"
        eff = self.padding_efficiency
        pad = f" ({eff:.0%} real tokens)" if eff is not None else ""
        reused = f" ({self.reused_records} reused from the interrupted run)" \
            if self.reused_records else ""
        return (f"{self.input_records} records in{reused}: {self.result_records} done "
                f"({self.output_rows} rows), {self.error_records} errors [{check}]; "
                f"{self.tokens} tokens in {self.seconds:.1f}s ({self.tokens_per_second:,.0f} "
                f"tokens/s), {self.batches} batches{pad}, {self.compiles} compiles"
                f"{self._accuracy_text()}{self._buckets_text()}; output {self.output}")

    def _buckets_text(self) -> str:
        if self.buckets is None:
            return ""
        text = "; buckets " + ", ".join(f"{n} {c}" for n, c in self.buckets.items())
        rule = self.filter or {}
        if rule.get("cut_points"):
            text += " (cut points " + "; ".join(
                (f"{c['group']}: " if c["group"] is not None else "")
                + ", ".join(f"{x:.6g}" for x in c["cuts"]) for c in rule["cut_points"]) + ")"
        elif rule:
            bounds = [f"{k.removesuffix('_value')} {rule[k]:.6g}"
                      for k in ("min_value", "max_value") if rule.get(k) is not None]
            text += f" ({rule.get('by')} {', '.join(bounds)})" if bounds else ""
        return text

    def _accuracy_text(self) -> str:
        if not self.labelled:
            return ""
        return (f"; accuracy {self.accuracy:.4f}, normalized {self.accuracy_norm:.4f} "
                f"({self.labelled} labelled)")


def summarize(results: Any, output: str, seconds: float, rows_per_record: int = 1,
              buckets: tuple[str, ...] | None = None,
              reused: dict[str, int] | None = None) -> JobSummary:
    """Read finished pipelines' counters (one result, or a list of them) into a JobSummary.

    `rows_per_record`: output rows each finished record gives (generate: the sample count);
    `buckets`: a filter's bucket names, whose counts are its results; `reused`: the counts of
    the work items an interrupted run completed (`pipeline.resume`), added to this run's.
    """
    counters: dict[str, int] = dict(reused or {})
    latency_ms = load_ms = 0
    for result in results if isinstance(results, list) else [results]:
        queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
        for c in queried["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (
                c.committed if c.committed is not None else c.attempted)
        latency_ms += sum(d.committed.sum if d.committed is not None else d.attempted.sum
                          for d in queried["distributions"]
                          if d.key.metric.name == BATCH_LATENCY_MS)
        load_ms += sum(d.committed.sum if d.committed is not None else d.attempted.sum
                       for d in queried["distributions"] if d.key.metric.name == MODEL_LOAD_MS)
    rows = counters.get(OUTPUT_ROWS, 0)
    counts = None
    if buckets is not None:
        counts = {n: counters.get(bucket(n), 0) for n in buckets}
        rows = sum(counts.values())
    labelled = counters.get(LABELLED, 0)
    return JobSummary(
        input_records=counters.get(RECORDS_READ, 0) + counters.get(READ_ERRORS, 0),
        output_rows=rows, result_records=rows // rows_per_record,
        error_records=counters.get(ERRORS, 0),
        tokens=counters.get(TOKENS, 0), padded_tokens=counters.get(PADDED_TOKENS, 0),
        input_tokens=counters.get(INPUT_TOKENS, 0),
        batches=counters.get(BATCHES, 0), compiles=counters.get(COMPILES, 0),
        seconds=seconds, output=output, model_seconds=latency_ms / 1000,
        model_load_seconds=load_ms / 1000, labelled=labelled,
        accuracy=counters.get(CORRECT, 0) / labelled if labelled else None,
        accuracy_norm=counters.get(CORRECT_NORM, 0) / labelled if labelled else None,
        buckets=counts,
        reused_records=(reused or {}).get(RECORDS_READ, 0) + (reused or {}).get(READ_ERRORS, 0),
        reused_tokens=(reused or {}).get(TOKENS, 0),
        model_failures=counters.get(MODEL_FAILURES, 0))
