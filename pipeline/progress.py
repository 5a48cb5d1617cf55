"""Live progress of a local run: a tqdm bar on a terminal, a plain line now and then otherwise.

The bar measures the input read (bytes of the input files, so every format gets an ETA, Parquet
by row group, text files by their read position); records, tokens and tokens/s come from the
model step. One Progress per job run and process, shared by the readers and the model step of
that run through `progress_for(run_id)`. On a pipe or in a log (not a terminal) a line is
written every PLAIN_INTERVAL_S seconds instead of redrawing, so CI logs stay readable.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import IO

# Seconds between the plain lines written when stderr is not a terminal.
PLAIN_INTERVAL_S = float(os.environ.get("GPT2_PIPELINE_PROGRESS_S", "30"))
_BAR_REFRESH_S = 0.5


class Progress:
    def __init__(self, total_bytes: int | None, total_records: int | None = None,
                 stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        self.total_bytes = total_bytes or None
        self.total_records = total_records
        self.records = self.tokens = 0
        self.bytes_done = 0.0
        self.start = time.perf_counter()
        self.last = self.start
        self._lock = threading.Lock()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            # A terminal that reports no size (a fresh pseudo-terminal) gets 100 columns.
            width = shutil.get_terminal_size((100, 20)).columns
            self.bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True,
                            desc="gpt2-pipeline", file=self.stream, ncols=width,
                            mininterval=_BAR_REFRESH_S, leave=True)

    def add(self, records: int, tokens: int) -> None:
        """Records finished and tokens computed by the model step."""
        with self._lock:
            self.records += records
            self.tokens += tokens
            self._show()

    def read(self, nbytes: float) -> None:
        """Bytes of the input consumed by a reader."""
        with self._lock:
            self.bytes_done += nbytes
            self._show()

    def _rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def _show(self) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.n = min(self.bytes_done, self.total_bytes or self.bytes_done)
            self.bar.set_postfix_str(f"{self.records:,} records, {self._rate():,.0f} tokens/s",
                                     refresh=False)
            self.bar.refresh() if now - self.last >= _BAR_REFRESH_S else None
            self.last = now if now - self.last >= _BAR_REFRESH_S else self.last
            return
        if now - self.last < PLAIN_INTERVAL_S:
            return
        self.last = now
        line = (f"[gpt2-pipeline] {self.records:,} records, {self.tokens:,} tokens, "
                f"{self._rate():,.0f} tokens/s")
        if self.total_bytes and self.bytes_done:
            done = min(1.0, self.bytes_done / self.total_bytes)
            eta = (now - self.start) * (1 - done) / done
            line += f", {done:.0%} of the input read, ETA {eta:,.0f}s"
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.total_bytes or self.bar.n
            self.bar.close()


_progress: dict[str, Progress] = {}
_lock = threading.Lock()


def register(run_id: str, total_bytes: int | None, total_records: int | None = None
             ) -> Progress:
    """The Progress of a run (created once per process)."""
    with _lock:
        if run_id not in _progress:
            _progress[run_id] = Progress(total_bytes, total_records)
        return _progress[run_id]


def progress_for(run_id: str | None) -> Progress | None:
    """The run's Progress in this process, None when the run shows none."""
    return _progress.get(run_id) if run_id else None


def finish(run_id: str | None) -> None:
    progress = _progress.pop(run_id, None) if run_id else None
    if progress is not None:
        progress.close()
