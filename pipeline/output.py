"""The output location's life: refuse or clear it before a job, mark it complete after one.

A job writes result shards under `<output>/` and error rows under `<output>-errors/`, and last
of all `<output>/_SUCCESS`. Reading an output back checks for the traces a killed job leaves.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence

from apache_beam.io.filesystems import FileSystems

from pipeline.formats import InputError, one_line


class OutputExistsError(ValueError):
    """The output location already holds files and overwriting was not requested."""


def errors_path(path: str) -> str:
    """Where the error records of an output `path` go: a sibling prefix `path-errors`."""
    return path.rstrip("/") + "-errors"


# Written by `pipeline.jobs.run` after both the results and the errors are finalized: the only
# sign that an output is complete. Beam renames each finished shard into place, so no part-*
# file is ever partial, but a job killed between the renames of its two outputs (or of several
# shards) leaves complete-looking shards of an incomplete run. Spark/Hadoop use the same name.
SUCCESS_MARKER = "_SUCCESS"
# Beam's FileBasedSink writes into `<output>/beam-temp-<prefix>-<uuid>/` and renames from there.
_BEAM_TEMP = "beam-temp-"


def mark_complete(path: str, text: str) -> None:
    """Write `path/_SUCCESS` (with `text`, e.g. the job summary): the output is complete."""
    with FileSystems.create(FileSystems.join(path, SUCCESS_MARKER)) as f:
        f.write(text.encode("utf-8"))


def is_complete(path: str) -> bool:
    """Whether `path` holds the output of a job that ran to the end (its `_SUCCESS` exists)."""
    return FileSystems.exists(FileSystems.join(path, SUCCESS_MARKER))


def interrupted(path: str, shards: list[str]) -> str | None:
    """Why `path` (without a marker) looks like a killed job's output, or None."""
    if any("/_resume/" in f for f in existing_files(path)):
        return "resume state of an unfinished run left"
    for prefix in (path, errors_path(path)):
        leftovers = [f for f in existing_files(prefix) if _BEAM_TEMP in f]
        if leftovers:
            return f"unfinished temp file {leftovers[0]!r}"
    counts: dict[int, set[int]] = defaultdict(set)
    for shard in shards:
        match = re.search(r"part-(\d+)-of-(\d+)", shard.rsplit("/", 1)[-1])
        if match:
            counts[int(match[2])].add(int(match[1]))
    for total, seen in counts.items():
        if len(counts) > 1 or seen != set(range(total)):
            return f"shards {sorted(seen)} of {total}"
    return None


def existing_files(prefix: str) -> list[str]:
    """Every file under `prefix`, sorted."""
    try:
        results = FileSystems.match([FileSystems.join(prefix, "**")])
    except Exception as e:
        raise OutputExistsError(f"cannot list output location {prefix!r}: {one_line(e)}") from e
    return sorted(m.path for r in results for m in r.metadata_list)


def _is_under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or lies below it (local paths compared absolute)."""
    if "://" not in path and "://" not in prefix:
        path, prefix = os.path.abspath(path), os.path.abspath(prefix)
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def prepare_output(path: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Make sure the output prefixes `path` and `errors_path(path)` hold no files.

    Beam names shards `part-SSSSS-of-NNNNN`, so a rerun with a different shard count would leave
    old shards next to new ones and readers would mix two runs. Hence: refuse when files exist,
    or with `overwrite` delete them (the `_SUCCESS` marker and the `beam-temp-*` files of a
    killed run included). Refused always: an input file (of `inputs`) under either prefix,
    which overwriting would delete before it is read, and a local prefix that is a file.
    """
    check_location(path, inputs)
    existing = existing_files(path) + existing_files(errors_path(path))
    if not existing:
        return
    # The marker goes first: an overwrite killed half-way must not leave it next to a remnant.
    existing.sort(key=lambda f: not f.endswith("/" + SUCCESS_MARKER))
    if not overwrite:
        raise OutputExistsError(
            f"output {path!r} already holds {len(existing)} file(s) (e.g. {existing[0]!r}); "
            "pass --overwrite to replace them, or --resume to finish an interrupted run"
        )
    FileSystems.delete(existing)


def check_location(path: str, inputs: Sequence[str] = ()) -> None:
    """Refuse an output (or its errors prefix) that holds an input file or is a file."""
    for prefix in (path, errors_path(path)):
        clash = next((f for f in inputs if _is_under(f, prefix)), None)
        if clash is not None:
            raise InputError(f"input file {clash!r} lies under the output location {prefix!r}; "
                             "choose an --output outside the input")
        if "://" not in prefix and os.path.exists(prefix) and not os.path.isdir(prefix):
            raise OutputExistsError(f"output location {prefix!r} is an existing file, not a "
                                    "directory; choose another --output")
