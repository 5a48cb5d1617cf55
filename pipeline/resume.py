"""Output written per input work item, each item completed atomically, so a killed job resumes.

A job's rows go to files named after the work item (a file, or a Parquet row group) they came
from, never to shards numbered by the runner:

    <output>/part-<key>.<ext>             the item's result rows (filter: <bucket>/part-<key>...)
    <output>-errors/part-<key>.jsonl      its error rows
    <output>/_resume/settings.json        what decides the results (model commit and file hashes
                                          included): a `--resume` with other settings is refused
    <output>/_resume/items/<key>.json     the item's counts, written last: the item is complete
    <output>/_resume/tmp/                 files being written

Rows stream into temp files while the item is processed; when every record the reader took from
the item has reached a writer (as result rows or error rows), the temp files are renamed into
place and the item's marker is written. A record is never split between items, and a marker
exists only for an item whose every output file is in place. `--resume` keeps the items with
markers, deletes everything else, and reads only the rest. `_resume/` goes when `_SUCCESS` is
written.

Why this works inside Beam: reading, the model step and writing of an item run in one fused
stage (the runner's fusion of ParDos after the Reshuffle; nothing between them materializes), so
the reader's count of an item and its rows meet in one worker process, in a `Ledger`. A runner
that did not fuse them would leave items unfinished: `finish` then fails the job loudly rather
than mark an incomplete output complete.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline import metrics, output, writers
from pipeline.formats import InputError

RESUME = "_resume"
# Settings that change how a job runs, not what it writes: a resume may differ in them. The
# batch budget is one (rows are the same within 1e-5 whatever the batching, README
# "Deterministic"), and its default follows the backend: a run interrupted at an explicit
# 8192 resumes at the default.
OPERATIONAL = frozenset({"overwrite", "progress", "report", "resume", "output",
                         "compilation_cache", "max_tokens_per_batch"})


class ResumeMismatchError(ValueError):
    """`--resume` with settings that differ from the interrupted run's."""


def state_dir(out: str, *parts: str) -> str:
    return FileSystems.join(out, RESUME, *parts)


def part_name(key: str, suffix: str) -> str:
    return f"part-{key}{suffix}"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one kind of row goes: a directory, its format and schema, and what it counts.

    counts_as: the metric a row adds one to (results, errors, a filter bucket, or None);
    tokens: the row's tokens scored or generated (a mode's `tokens(row, config)`).
    """

    prefix: str
    fmt: str
    schema: pa.Schema | None
    counts_as: str | None
    tokens: Callable[[dict, Any], int] | None = None
    config: Any = None
    is_errors: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every step of one job run needs to find its process's ledger (picklable)."""

    run_id: str
    output: str
    units_per_record: int = 1  # generate: a record is done when all its samples are


class _Item:
    def __init__(self) -> None:
        self.expected: int | None = None
        self.units = 0
        self.counts: Counter = Counter()
        self.files: dict[str, tuple[str, str, Any, Any]] = {}  # final -> tmp, final, file, sink


class Ledger:
    """One job run's open work items in this process: the ranges each covers, the rows written
    so far, and the count the reader reported; an item commits when they meet."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._ranges: dict[str, list[tuple[int, str]]] = {}
        self._claims: dict[tuple[str, int], str] = {}  # records outside their item's range
        self._items: dict[str, _Item] = {}
        self._lock = threading.RLock()

    def begin(self, path: str, first_row: int, key: str) -> None:
        """The reader starts an item: records of `path` from `first_row` on belong to `key`."""
        with self._lock:
            ranges = self._ranges.setdefault(path, [])
            if (first_row, key) not in ranges:
                bisect.insort(ranges, (first_row, key))
            self._items.setdefault(key, _Item())

    def claim(self, path: str, index: int, key: str) -> None:
        """Record `index` of `path` belongs to `key` although outside its range (an error record
        after a row group's last row, reporting rows the footer did not announce)."""
        with self._lock:
            self._claims[(path, index)] = key

    def read_done(self, key: str, ok: int, bad: int) -> None:
        """The reader produced `ok` records and `bad` error records from the item."""
        with self._lock:
            item = self._items[key]
            item.expected = (ok + bad) * self.spec.units_per_record
            item.counts[metrics.RECORDS_READ] += ok
            item.counts[metrics.READ_ERRORS] += bad
            self._maybe_commit(key)

    def _key_of(self, source: str, index: int) -> str:
        if (source, index) in self._claims:
            return self._claims[(source, index)]
        ranges = self._ranges.get(source)
        at = bisect.bisect_right(ranges or [], (index, "\uffff")) - 1
        if not ranges or at < 0:
            raise RuntimeError(
                f"a row of {source!r} (record {index}) reached the writer in another process "
                "than its reader: the runner did not fuse reading and writing, which "
                "per-item output needs")
        return ranges[at][1]

    def add(self, target: Target, source: str, index: int, row: dict, units: int) -> None:
        """Write `row` (of record `index` of `source`) to its item's file of `target`."""
        with self._lock:
            key = self._key_of(source, index)
            item = self._items[key]
            suffix = writers.OUTPUT_FORMATS[target.fmt].suffix
            final = FileSystems.join(target.prefix, part_name(key, suffix))
            if final not in item.files:
                tmp = state_dir(self.spec.output, "tmp", f"{key}.{uuid.uuid4().hex[:12]}{suffix}")
                f = FileSystems.create(tmp)
                item.files[final] = (tmp, final, f,
                                     writers.OUTPUT_FORMATS[target.fmt].sink(f, target.schema))
            item.files[final][3].write(row)
            item.units += units
            if target.counts_as:
                item.counts[target.counts_as] += 1
            if target.tokens is not None:
                item.counts[metrics.TOKENS] += target.tokens(row, target.config)
            if row.get("correct") is not None:  # multiple choice with a label
                item.counts[metrics.LABELLED] += 1
                item.counts[metrics.CORRECT] += bool(row["correct"])
                item.counts[metrics.CORRECT_NORM] += bool(row["correct_norm"])
            self._maybe_commit(key)

    def _maybe_commit(self, key: str) -> None:
        item = self._items[key]
        if item.expected is None or item.units < item.expected:
            return
        if item.units > item.expected:
            raise RuntimeError(f"work item {key}: {item.units} outputs for {item.expected} "
                               "expected; a record was written twice")
        for tmp, final, f, sink in item.files.values():
            sink.close()
            f.close()
            _rename(tmp, final)  # a retried bundle's item overwrites: the same name
        write_text(state_dir(self.spec.output, "items", f"{key}.json"),
                   json.dumps(dict(item.counts), sort_keys=True))
        del self._items[key]


_LEDGERS: dict[str, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def ledger(spec: Spec) -> Ledger:
    """This process's ledger of the run `spec` (created on first use)."""
    with _LEDGERS_LOCK:
        if spec.run_id not in _LEDGERS:
            _LEDGERS[spec.run_id] = Ledger(spec)
        return _LEDGERS[spec.run_id]


def forget(spec: Spec) -> None:
    with _LEDGERS_LOCK:
        _LEDGERS.pop(spec.run_id, None)


class _WriteItemRows(beam.DoFn):
    """(source, index, row) or an error row -> the row in its work item's file."""

    def __init__(self, spec: Spec, target: Target):
        self.spec = spec
        self.target = target

    def setup(self) -> None:
        self.ledger = ledger(self.spec)

    def process(self, element):
        if self.target.is_errors:
            row = element
            source, index = row["source"], row["line"]
            # A generate sample that failed alone is one of its record's samples.
            units = 1 if "sample_index" in row else self.spec.units_per_record
        else:
            source, index, row = element
            units = 1
        self.ledger.add(self.target, source, index, row, units)


class WriteItems(beam.PTransform):
    """Write rows into per-work-item files of `target` (see the module docstring)."""

    def __init__(self, spec: Spec, target: Target):
        super().__init__()
        self.spec = spec
        self.target = target

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteItemRows" >> beam.ParDo(_WriteItemRows(self.spec, self.target))


# ---- the launcher's side: settings, what a resume keeps, closing a finished run ----------

def _rename(src: str, dst: str) -> None:
    if "://" not in dst:  # object stores have no directories; a local rename needs one
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    FileSystems.rename([src], [dst])


def write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all (a temp name, then a rename)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(text.encode("utf-8"))
    _rename(tmp, path)


def _read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def settings_of(job: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a job's rows, flat (`temperature`, not `sampling.temperature`),
    as JSON values: every job setting but the operational ones, and the model's commit and
    file hashes (a local checkpoint changed in place is a different model)."""
    flat: dict[str, Any] = {}
    for name, value in job.items():
        if isinstance(value, dict):
            flat.update(value)
        elif name not in OPERATIONAL:
            flat[name] = value
    flat["model_commit"] = model.get("commit")
    flat["model_files"] = model.get("files")
    return json.loads(json.dumps(flat, sort_keys=True))


def _check_same(recorded: dict[str, Any], now: dict[str, Any], out: str) -> None:
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            option = "--" + name.replace("_", "-")
            raise ResumeMismatchError(
                f"--resume: {out!r} was written with {option}={recorded.get(name)!r}, this run "
                f"has {now.get(name)!r}; rerun with the interrupted run's settings, or pass "
                "--overwrite to start over")


@dataclasses.dataclass
class Resumed:
    """What a run starts from: the items already complete, with their counts."""

    done: dict[str, dict[str, int]]
    settings: dict[str, Any]
    out: str
    complete: dict[str, Any] | None = None  # the `_SUCCESS` record of an output already done

    def start(self) -> None:
        """Record the settings (a fresh run), just before the first row is written: a job
        refused before that leaves the output location untouched."""
        marker = state_dir(self.out, "settings.json")
        if not FileSystems.exists(marker):
            write_text(marker, json.dumps(self.settings, sort_keys=True))

    @property
    def counts(self) -> Counter:
        total: Counter = Counter()
        for counts in self.done.values():
            total.update(counts)
        return total

    @property
    def records(self) -> int:
        c = self.counts
        return c[metrics.RECORDS_READ] + c[metrics.READ_ERRORS]


def prepare(out: str, settings: dict[str, Any], resume: bool, overwrite: bool,
            inputs: list[str]) -> Resumed:
    """Make the output location ready: fresh (refuse or clear it, as `output.prepare_output`),
    or with `resume` keep the complete items of an interrupted run with the same settings."""
    if resume and overwrite:
        raise ValueError("--resume keeps an interrupted run's output and --overwrite deletes "
                         "it: pass one of them")
    if resume and output.is_complete(out):
        record = _read_json(FileSystems.join(out, output.SUCCESS_MARKER))
        _check_same(settings_of(record.get("job", {}), record.get("model", {})), settings, out)
        return Resumed({}, settings, out, complete=record)
    marker = state_dir(out, "settings.json")
    if resume and FileSystems.exists(marker):
        _check_same(_read_json(marker), settings, out)
        output.check_location(out, inputs)
        done = {key: _read_json(path) for key, path in _committed(out).items()}
        _delete_unfinished(out, set(done))
        return Resumed(done, settings, out)
    try:
        output.prepare_output(out, overwrite, inputs=inputs)
    except output.OutputExistsError as err:
        if resume:
            raise output.OutputExistsError(
                f"--resume: {out!r} holds files but no resume state of an interrupted run "
                "(written before per-item output, or by another tool); pass --overwrite") \
                from err
        raise
    return Resumed({}, settings, out)


def _delete_unfinished(out: str, done: set[str]) -> None:
    """Delete every file of `out` and its errors but the resume state and complete items'."""
    doomed = []
    for prefix in (out, output.errors_path(out)):
        for path in output.existing_files(prefix):
            name = path.rsplit("/", 1)[-1]
            if f"/{RESUME}/" in path:
                keep = (name == "settings.json" or
                        (path.endswith(".json") and "/items/" in path
                         and name.removesuffix(".json") in done))
            else:
                keep = name.startswith("part-") and _key_of_name(name) in done
            if not keep:
                doomed.append(path)
    if doomed:
        FileSystems.delete(doomed)


def _key_of_name(name: str) -> str:
    """`part-<key>.<ext>`, or a temp file `<key>.<uuid>.<ext>` -> key (keys hold no dots; see
    formats.base.item_key)."""
    return name.removeprefix("part-").split(".", 1)[0]


def _committed(out: str) -> dict[str, str]:
    """Complete items of `out`: key -> the path of its counts (`_resume/items/<key>.json`)."""
    found = FileSystems.match([state_dir(out, "items", "*.json")])[0].metadata_list
    return {_key_of_name(m.path.rsplit("/", 1)[-1]): m.path for m in found}


def finish(out: str, targets: list[Target]) -> None:
    """After a successful run: every item must be complete; give each output directory at
    least one (empty) file, as a Beam writer does: the schema is on disk, and a reader finds
    a finished output with no rows rather than none."""
    tmp = output.existing_files(state_dir(out, "tmp"))
    committed = _committed(out)
    unfinished = [p for p in tmp if _key_of_name(p.rsplit("/", 1)[-1]) not in committed]
    if unfinished:
        raise RuntimeError(f"the job finished but {len(unfinished)} work item file(s) were "
                           f"never completed (e.g. {unfinished[0]!r}): the runner did not run "
                           "reading and writing of an item in one fused stage")
    if tmp:  # a retried bundle's abandoned files; the retry completed the item
        FileSystems.delete(tmp)
    for target in {t.prefix: t for t in targets}.values():
        fmt = writers.OUTPUT_FORMATS[target.fmt]
        if not FileSystems.match([FileSystems.join(target.prefix, "part-*")])[0].metadata_list:
            path = FileSystems.join(target.prefix, part_name("empty", fmt.suffix))
            with FileSystems.create(path) as f:
                fmt.sink(f, target.schema).close()


def unmark(out: str, keep: Iterable[str] = ()) -> None:
    """Take the completion markers off every item of `out` but `keep`: a `--resume` then
    deletes and redoes those items (a run whose model calls all failed)."""
    kept = set(keep)
    doomed = [path for key, path in _committed(out).items() if key not in kept]
    if doomed:
        FileSystems.delete(doomed)


def clear(out: str) -> None:
    """Remove the resume state of a finished output (after `_SUCCESS` is written)."""
    files = output.existing_files(state_dir(out))
    if files:
        FileSystems.delete(files)
    if "://" not in out:
        import shutil

        shutil.rmtree(state_dir(out), ignore_errors=True)


__all__ = ["InputError", "Ledger", "ResumeMismatchError", "Resumed", "Spec", "Target",
           "WriteItems", "clear", "finish", "ledger", "prepare", "settings_of", "unmark"]
