"""Filter mode: score every record, then route the record itself into a bucket by its score.

Records are scored as in `score` (rolling windows past the context); the row is the input
record unchanged with score columns appended (`<prefix>perplexity`, `<prefix>bits_per_byte`,
`<prefix>mean_logprob`, `<prefix>num_tokens`). A `Rule` puts each row in a bucket: thresholds
(`kept`/`dropped`) or quantile buckets whose cut points come from this corpus (per group) or
from an earlier filter job. Buckets are in ascending order of the rule's value; a value equal to
a cut point goes to the lower bucket, so ties go the same way every run.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from typing import Any

import apache_beam as beam
import pyarrow as pa

from pipeline.modes import score
from pipeline.records import ERRORS, Record

BY = ("perplexity", "bits_per_byte", "mean_logprob")
THRESHOLD_BUCKETS = ("kept", "dropped")
# ApproximateQuantiles: cut points are read off a grid of QUANTILE_GRID + 1 quantiles computed
# with this epsilon, so a cut point's rank is within QUANTILE_ERROR of the asked fraction.
QUANTILE_GRID = 1000
QUANTILE_EPSILON = 1e-3
QUANTILE_ERROR = QUANTILE_EPSILON + 0.5 / QUANTILE_GRID


def appended_fields(prefix: str) -> list[pa.Field]:
    """The score columns a filter appends to every record."""
    return [pa.field(f"{prefix}perplexity", pa.float64()),
            pa.field(f"{prefix}bits_per_byte", pa.float64()),
            pa.field(f"{prefix}mean_logprob", pa.float64()),
            pa.field(f"{prefix}num_tokens", pa.int32())]


def schema(config: Any, input_schema: pa.Schema | None = None) -> pa.Schema:
    """The input schema (Parquet) with the score columns appended; their names must be new."""
    fields = list(input_schema or []) + appended_fields(config.score_prefix)
    names = [f.name for f in fields]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise ValueError(f"the input already has a column {clash!r}, which the filter would "
                         "append; choose another --score-prefix")
    return pa.schema(fields)


@dataclasses.dataclass(frozen=True)
class FilterMeta(score.ScoreMeta):
    """A scored record's info for its filter row: the whole input record."""

    original: dict[str, Any] | None = None


def make_items(rec: Record, config: Any, tokenizer: Any, context: int):
    """A record -> its ScoreItems (as `score`), or an error row for a column clash."""
    taken = [f.name for f in appended_fields(config.score_prefix) if f.name in rec.original]
    if taken:
        yield beam.pvalue.TaggedOutput(ERRORS, rec.error(
            f"the record already has a field {taken[0]!r}, which the filter would append; "
            "choose another --score-prefix"))
        return
    if config.group_field and rec.original.get(config.group_field) is None:
        yield beam.pvalue.TaggedOutput(ERRORS, rec.error(
            f"missing or null group field {config.group_field!r}"))
        return
    yield from score.make_items(rec, config, tokenizer, context, meta_type=FilterMeta,
                                original=rec.original)


def row(result: score.PartScores, config: Any) -> dict[str, Any]:
    """The input record with its score columns appended (its own keys first, in order)."""
    meta: FilterMeta = result.meta
    stats = score.doc_stats(result.logprobs.astype("float32"), meta.num_bytes)
    p = config.score_prefix
    return {**meta.original, f"{p}perplexity": stats["perplexity"],
            f"{p}bits_per_byte": stats["bits_per_byte"],
            f"{p}mean_logprob": stats["mean_logprob"], f"{p}num_tokens": stats["num_tokens"]}


def group_of(record: dict[str, Any], config: Any) -> str | None:
    """The record's group (its --group-field value as text), None without a group field."""
    if not config.group_field:
        return None
    value = record.get(config.group_field)
    return value if isinstance(value, str) or value is None else json.dumps(value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a value (and group) picks a bucket; recorded in `_SUCCESS` to be applied again."""

    by: str
    names: tuple[str, ...]
    min_value: float | None = None
    max_value: float | None = None
    quantiles: tuple[float, ...] = ()
    cut_points: tuple[tuple[str | None, tuple[float, ...]], ...] | None = None  # per group
    group_field: str | None = None

    @property
    def needs_cut_points(self) -> bool:
        return bool(self.quantiles) and self.cut_points is None

    def bucket(self, value: float, group: str | None) -> str:
        """The bucket of a value; KeyError for a group the cut points do not know."""
        if not self.quantiles:
            ok = ((self.min_value is None or value >= self.min_value)
                  and (self.max_value is None or value <= self.max_value))
            return self.names[0] if ok else self.names[1]
        cuts = dict(self.cut_points)[group if self.group_field else None]
        return self.names[bisect.bisect_left(cuts, value)]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.cut_points is not None:
            d["cut_points"] = [{"group": g, "cuts": list(c)} for g, c in self.cut_points]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rule:
        cut_points = None
        if d.get("cut_points") is not None:
            cut_points = tuple((c["group"], tuple(float(x) for x in c["cuts"]))
                               for c in d["cut_points"])
        return cls(by=d["by"], names=tuple(d["names"]), min_value=d.get("min_value"),
                   max_value=d.get("max_value"), quantiles=tuple(d.get("quantiles") or ()),
                   cut_points=cut_points, group_field=d.get("group_field"))


def rule_of(config: Any) -> Rule:
    """The rule a filter config asks for (cut points still to compute for quantiles)."""
    if config.quantiles:
        names = config.bucket_names or tuple(f"q{i}" for i in range(len(config.quantiles) + 1))
        return Rule(config.by, tuple(names), quantiles=tuple(config.quantiles),
                    group_field=config.group_field)
    return Rule(config.by, THRESHOLD_BUCKETS, min_value=config.min_value,
                max_value=config.max_value)


def cut_points(grid: list[float], quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """Cut points at `quantiles` from ApproximateQuantiles' output: a grid of QUANTILE_GRID + 1
    evenly spaced quantiles, or every value sorted when the group had fewer."""
    if len(grid) == QUANTILE_GRID + 1:
        return tuple(float(grid[round(q * QUANTILE_GRID)]) for q in quantiles)
    n = len(grid)  # all values: the empirical quantile, the value at rank ceil(q * n)
    return tuple(float(grid[max(0, math.ceil(q * n - 1e-9) - 1)]) for q in quantiles)


def tokens(row: dict[str, Any], config: Any) -> int:
    """The tokens a filter row's record scored."""
    return row.get(config.score_prefix + "num_tokens") or 0


def check_config(config: Any) -> None:
    """A filter job's rule settings."""
    if config.by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, got {config.by!r}")
    thresholds = config.min_value is not None or config.max_value is not None
    rules = [name for name, given in (("--max-value/--min-value", thresholds),
                                      ("--quantiles", bool(config.quantiles)),
                                      ("--thresholds-from", bool(config.thresholds_from)))
             if given]
    if len(rules) != 1:
        raise ValueError("a filter needs exactly one rule: --max-value and/or --min-value, "
                         "--quantiles, or --thresholds-from" +
                         (f" (got {' and '.join(rules)})" if rules else ""))
    if (config.min_value is not None and config.max_value is not None
            and config.min_value > config.max_value):
        raise ValueError(f"min_value {config.min_value} is above max_value {config.max_value}")
    q = list(config.quantiles)
    if q and (any(not 0.0 < x < 1.0 for x in q) or q != sorted(set(q))):
        raise ValueError("quantiles must be strictly increasing and strictly inside (0, 1)")
    if config.bucket_names:
        if not q:
            raise ValueError("bucket_names go with quantiles")
        if len(config.bucket_names) != len(q) + 1:
            raise ValueError(f"{len(q)} quantiles make {len(q) + 1} buckets, got "
                             f"{len(config.bucket_names)} bucket_names")
        bad = next((n for n in config.bucket_names
                    if not n or n.startswith((".", "_")) or "/" in n or "\\" in n), None)
        if bad is not None or len(set(config.bucket_names)) != len(config.bucket_names):
            raise ValueError(f"bucket_names must be distinct directory names, not "
                             f"starting with '.' or '_' (got {bad!r})")
    if config.group_field and not (q or config.thresholds_from):
        raise ValueError("group_field goes with quantiles or thresholds_from: thresholds "
                         "are the same for every group")
