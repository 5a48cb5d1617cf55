"""Reading a finished output for the report: streaming, only the columns asked for.

Rows are read a batch at a time (Parquet by record batch of the columns needed, JSONL and CSV by
chunks of lines), so memory is bounded by a batch plus the fixed-size samples the report keeps:
a uniform reservoir per value column (for quantiles), the N lowest and highest rows, N sampled
rows. Example rows are fetched afterwards by (shard, row) with all their columns.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

BATCH_ROWS = 8192
RESERVOIR = 50_000  # values kept per column for the quantile table (all of them below this)


def shards(directory: str | Path) -> list[Path]:
    """The result shards of an output directory, in name order."""
    return sorted(p for p in Path(directory).glob("part-*") if p.is_file())


def _fmt(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in ("parquet", "jsonl", "csv", "tsv") if name.endswith("." + s)),
                "jsonl")


def iter_batches(path: Path, columns: list[str]) -> Iterator[dict[str, list]]:
    """Batches of `columns` (those the shard has; others are all None) of one shard."""
    fmt = _fmt(path)
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=present or None):
            data = batch.to_pydict() if present else {}
            n = batch.num_rows
            yield {c: data.get(c, [None] * n) for c in columns}
        return
    with path.open("rb") as f:
        if fmt in ("csv", "tsv"):
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            rows = csv.DictReader(text, delimiter="," if fmt == "csv" else "\t")
        else:
            rows = (json.loads(line) for line in f if line.strip())
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= BATCH_ROWS:
                yield {c: [r.get(c) for r in chunk] for c in columns}
                chunk = []
        if chunk:
            yield {c: [r.get(c) for r in chunk] for c in columns}


def fetch_rows(path: Path, rows: set[int]) -> dict[int, dict]:
    """Whole rows of one shard by row number (for the examples the report shows)."""
    out: dict[int, dict] = {}
    if not rows:
        return out
    fmt = _fmt(path)
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            wanted = [r for r in rows if start <= r < start + n]
            if wanted:
                table = pf.read_row_group(g)
                for r in wanted:
                    out[r] = table.slice(r - start, 1).to_pylist()[0]
            start += n
        return out
    for i, batch in enumerate(_all_rows(path, fmt)):
        if i in rows:
            out[i] = batch
            if len(out) == len(rows):
                break
    return out


def _all_rows(path: Path, fmt: str) -> Iterator[dict]:
    with path.open("rb") as f:
        if fmt in ("csv", "tsv"):
            yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""),
                                      delimiter="," if fmt == "csv" else "\t")
        else:
            yield from (json.loads(line) for line in f if line.strip())


def number(x: Any) -> float | None:
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclasses.dataclass
class ValueStats:
    """Count, exact min/max and a uniform reservoir of one numeric column (None skipped)."""

    seed: int = 0
    count: int = 0
    missing: int = 0
    low: float = math.inf
    high: float = -math.inf
    sample: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(self, value: Any) -> None:
        v = number(value)
        if v is None:
            self.missing += 1
            return
        self.count += 1
        self.low, self.high = min(self.low, v), max(self.high, v)
        if len(self.sample) < RESERVOIR:
            self.sample.append(v)
        else:
            j = int(self._rng.integers(0, self.count))
            if j < RESERVOIR:
                self.sample[j] = v

    @property
    def exact(self) -> bool:
        return self.count <= RESERVOIR

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Quantiles of the values (exact below RESERVOIR values, else of the uniform sample),
        numpy's default (linear) definition."""
        return [float(x) for x in np.quantile(np.array(self.sample), qs)] if self.sample else []


class Extremes:
    """The `n` rows with the lowest and highest value, and `n` uniformly sampled rows."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.low: list[tuple[float, int, int, int]] = []  # max-heap by -value
        self.high: list[tuple[float, int, int, int]] = []  # min-heap by value
        self.sampled: list[tuple[int, int]] = []
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, value: Any, shard: int, row: int) -> None:
        self.seen += 1
        if len(self.sampled) < self.n:
            self.sampled.append((shard, row))
        else:
            j = int(self._rng.integers(0, self.seen))
            if j < self.n:
                self.sampled[j] = (shard, row)
        v = number(value)
        if v is None:
            return
        key = (shard, row)
        order = self.seen  # ties: the first row read wins, every run
        if len(self.low) < self.n:
            heapq.heappush(self.low, (-v, -order, *key))
        elif -v > self.low[0][0]:
            heapq.heapreplace(self.low, (-v, -order, *key))
        if len(self.high) < self.n:
            heapq.heappush(self.high, (v, -order, *key))
        elif v > self.high[0][0]:
            heapq.heapreplace(self.high, (v, -order, *key))

    def lowest(self) -> list[tuple[float, int, int]]:
        return [(-v, s, r) for v, _, s, r in sorted(self.low, key=lambda t: (-t[0], -t[1]))]

    def highest(self) -> list[tuple[float, int, int]]:
        return [(v, s, r) for v, _, s, r in sorted(self.high, key=lambda t: (-t[0], -t[1]))]


def histogram(paths: list[Path], column: str, edges: np.ndarray,
              where: tuple[str, Any] | None = None) -> np.ndarray:
    """Counts of `column`'s values in the bins `edges`, streamed over the shards (only rows
    whose field `where[0]` is `where[1]`, when given)."""
    counts = np.zeros(len(edges) - 1, np.int64)
    for path in paths:
        for batch in iter_batches(path, [column] + ([where[0]] if where else [])):
            values = batch[column] if not where else [
                v for v, g in zip(batch[column], batch[where[0]], strict=True) if g == where[1]]
            vals = np.array([v for v in map(number, values) if v is not None])
            if vals.size:
                counts += np.histogram(np.clip(vals, edges[0], edges[-1]), edges)[0]
    return counts


def read_errors(directory: str | Path, examples: int = 3) -> tuple[dict[str, int], dict]:
    """Error rows counted by reason (numbers and quoted values folded, so one kind of failure
    is one line) with a few raw examples of each."""
    import re

    counts: dict[str, int] = {}
    samples: dict[str, list[dict]] = {}
    for path in shards(directory):
        for batch in iter_batches(path, ["source", "line", "id", "reason", "raw"]):
            for i, reason in enumerate(batch["reason"]):
                kind = re.sub(r"'[^']*'", "'…'", re.sub(r"\d+", "N", str(reason)))[:160]
                counts[kind] = counts.get(kind, 0) + 1
                if len(samples.setdefault(kind, [])) < examples:
                    samples[kind].append({k: batch[k][i] for k in batch})
    return counts, samples


def length_histogram(paths: list[Path], bin_edges: np.ndarray) -> np.ndarray:
    """Counts of generated lengths (tokens per row) in the bins, streamed over the shards."""
    counts = np.zeros(len(bin_edges) - 1, np.int64)
    for path in paths:
        for batch in iter_batches(path, ["token_ids"]):
            counts += np.histogram([len(x or []) for x in batch["token_ids"]], bin_edges)[0]
    return counts


def edges(stats: ValueStats, log_x: bool, bins: int = 40) -> np.ndarray:
    """Histogram bin edges over a column's exact range (log-spaced when asked and positive)."""
    lo, hi = stats.low, stats.high
    if log_x and lo > 0:
        return np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)
    return np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
