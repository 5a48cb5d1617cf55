"""Batch shapes: packing token sequences into fixed rows, row-count rounding, left padding.

Everything here is host-side numpy about *shapes*, not meaning: a jitted function compiles once
per shape, so the helpers below decide how few shapes a stream of texts or prompts needs. The
scorer packs texts into rows (`pack_rows`, `RowPacker`), the generator left-pads prompts
(`left_pad`) and packs them for its prefill (`plan_prefill`); both round part-filled batches
with `step_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from flax import struct


class Packable(Protocol):
    """Anything with the token ids a row holds and the targets they predict."""

    input_ids: Sequence[int]
    targets: Sequence[int]


def round_up(n: int, multiple: int, cap: int) -> int:
    """`n` rounded up to a multiple of `multiple`, never past `cap`."""
    return min(cap, multiple * math.ceil(n / multiple))


def step_rows(used: int, full: int, steps: int, multiple: int = 1) -> int:
    """`used` rows padded up to the next step of a batch of `full` rows.

    Steps are ceil(full / steps) rows (rounded up to `multiple`, e.g. the device count) and the
    result never passes `full` rounded up to `multiple`: a part-filled batch costs at most one
    step of padding, and a batch size takes at most `steps` shapes (compiles). Used for the
    pipeline's tail batches and for generation's packed prefill.
    """
    cap = multiple * math.ceil(full / multiple)
    step = multiple * math.ceil(math.ceil(full / steps) / multiple)
    return round_up(used, step, cap)


def pack_rows(rows: Sequence[Sequence[Packable]], length: int, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
    """Pack several token windows per row into fixed [batch_size, length] arrays.

    Returns (ids, targets, segment ids, offsets): window j of row r starts at offsets[r][j] and
    has segment id j + 1, so it attends only to itself and its positions start at 0. Packing
    short texts together is what keeps padding low with a single compiled shape.
    """
    ids, tgt, seg, _, _, offsets = pack_branched_rows(rows, length, batch_size)
    return ids, tgt, seg, offsets


def pack_branched_rows(rows: Sequence[Sequence[Packable]], length: int, batch_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                  list[list[int]]]:
    """`pack_rows` plus [batch_size, length] branch ids and position ids.

    An item with `branches` and `positions` (a shared prefix and its continuations, see
    `gpt2model.scoring.TokenTree`) keeps them; a plain window is branch 0 at positions 0..n-1.
    """
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    ids = np.zeros((batch_size, length), np.int32)
    tgt = np.zeros((batch_size, length), np.int32)
    seg = np.zeros((batch_size, length), np.int32)
    branch = np.zeros((batch_size, length), np.int32)
    pos = np.zeros((batch_size, length), np.int32)
    offsets = []
    for r, row in enumerate(rows):
        at, starts = 0, []
        for j, w in enumerate(row):
            n = len(w.input_ids)
            if at + n > length:
                raise ValueError(f"row {r} holds more than {length} tokens")
            ids[r, at:at + n] = w.input_ids
            tgt[r, at:at + n] = w.targets
            seg[r, at:at + n] = j + 1
            branches = getattr(w, "branches", None)
            if branches is not None:
                branch[r, at:at + n] = branches
                pos[r, at:at + n] = w.positions
            else:
                pos[r, at:at + n] = np.arange(n)
            starts.append(at)
            at += n
        offsets.append(starts)
    return ids, tgt, seg, branch, pos, offsets


def pack_windows(windows: Sequence[Packable], length: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad windows one per row into fixed [batch_size, length] int32 arrays (ids,
    targets, mask): `pack_rows` with a single window per row, whose segment ids are the mask.

    Pads are token 0 with mask 0; rows beyond len(windows) are all padding. A fixed shape per
    bucket is what keeps the jitted scorer from recompiling.
    """
    if len(windows) > batch_size:
        raise ValueError(f"{len(windows)} windows do not fit a batch of {batch_size}")
    for w in windows:
        if len(w.input_ids) > length:
            raise ValueError(f"window of {len(w.input_ids)} tokens does not fit length {length}")
    ids, tgt, mask, _ = pack_rows([[w] for w in windows], length, batch_size)
    return ids, tgt, mask


# Open rows a RowPacker keeps at least, whatever its batch's row count: best fit needs choice.
# A CPU's batches of 2 rows of 1024 packed the 200-document benchmark corpus 0.964 full over a
# pool of 4 rows, 0.986 over 8, as 8-row batches over 16 did (16 or 32 rows: no better; figures
# in BENCHMARKS.md, "Design measurements", from `python -m bench.batch_study`).
MIN_OPEN_ROWS = 8


class RowPacker:
    """Streaming best-fit packing of items into batches of `rows` rows of `length` tokens.

    Keeps at most max(2 x rows, MIN_OPEN_ROWS) open rows; when an item fits none and the pool
    is full, the `rows` fullest rows leave as a batch. Memory stays bounded whatever the
    stream's length, and batches come out fuller than first-come batching of length buckets.
    """

    def __init__(self, length: int, rows: int):
        self.length, self.rows = length, rows
        self.pool = max(2 * rows, MIN_OPEN_ROWS)
        self.open: list[list] = []  # [used tokens, [items]]

    def add(self, item: Any, size: int) -> list[list[list[Any]]]:
        """Place an item; returns the batches (lists of rows of items) this completed."""
        if not 0 < size <= self.length:
            raise ValueError(f"item of {size} tokens does not fit rows of {self.length}")
        fits = [row for row in self.open if row[0] + size <= self.length]
        if fits:
            row = max(fits, key=lambda r: r[0])  # best fit: the fullest row it fits in
            row[0] += size
            row[1].append(item)
            return []
        out = []
        if len(self.open) >= self.pool:
            self.open.sort(key=lambda r: -r[0])
            out.append([items for _, items in self.open[:self.rows]])
            self.open = self.open[self.rows:]
        self.open.append([size, [item]])
        return out

    def flush(self) -> list[list[list[Any]]]:
        """Every open row, fullest first, in batches of at most `rows` rows."""
        self.open.sort(key=lambda r: -r[0])
        out = [[items for _, items in self.open[i:i + self.rows]]
               for i in range(0, len(self.open), self.rows)]
        self.open = []
        return out


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch_size: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts into [batch_size, length] (ids, mask); extra rows are all padding."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for r, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt of {len(p)} tokens does not fit length {length}")
        if p:
            ids[r, length - len(p):] = p
            mask[r, length - len(p):] = 1
    # A row with no real token would attend to nothing; give padding rows one visible slot.
    mask[len(prompts):, -1] = 1
    return ids, mask


@struct.dataclass
class PrefillPlan:
    """Left-padded prompts packed several to a row for the prefill (host-side numpy).

    Prompt b's n_b tokens sit in packed row `row[b]` from column `start[b]`; `segments` numbers
    the prompts of a row (0 = empty). Prefilling packed rows skips the left padding's compute;
    the keys and values are then moved to the left-padded cache rows the decode loop uses, so
    everything after the prefill is as before. Rows planned as repeats of another's prompt
    (the samples of one record) point at its packed copy: that prompt is prefilled once.
    """

    ids: np.ndarray  # [R, P] int32
    segments: np.ndarray  # [R, P] int32
    row: np.ndarray  # [B] int32
    start: np.ndarray  # [B] int32
    lengths: np.ndarray  # [B] int32


# Tokens per forward pass on CPU, for scoring batches and generation's prefill: a pass of this
# size keeps its activations in the processor's caches, and both the matmuls and the whole
# step run faster per token than in larger passes (BENCHMARKS.md, "Batch budget on CPU" and
# "Prefill in passes of 2048 tokens"). Accelerators take the whole batch in one pass.
CPU_STEP_TOKENS = 2048


def step_token_budget() -> int | None:
    """Tokens per forward pass for the backend JAX runs on: CPU_STEP_TOKENS on CPU, None (no
    limit of its own: the whole batch in one pass) elsewhere. Scoring batches and generation's
    prefill passes both default to it."""
    import jax

    return CPU_STEP_TOKENS if jax.default_backend() == "cpu" else None


def pass_rows(rows: int, length: int, budget: int | None, multiple: int = 1) -> int:
    """Rows per forward pass when `rows` rows of `length` tokens go through in passes of at
    most `budget` tokens (None: all at once), the passes as even as the rounding to `multiple`
    (the device count: each pass stays split over every device) allows."""
    if budget is None or rows * length <= budget:
        return rows
    per = max(multiple, multiple * (budget // length // multiple))
    passes = math.ceil(rows / per)
    return min(rows, multiple * math.ceil(math.ceil(rows / passes) / multiple))


# A batch of B prompts packs into ceil(B / PREFILL_STEPS)-row steps: at most PREFILL_STEPS
# prefill shapes (each one compile) per (batch, prompt length, settings). More steps waste less
# padding but compile more often; BENCHMARKS.md has the measured trade-off.
PREFILL_STEPS = 8


def plan_prefill(prompt_ids: np.ndarray, prompt_mask: np.ndarray, pad_id: int,
                 row_multiple: int = 1, steps: int = PREFILL_STEPS,
                 same_as: np.ndarray | None = None) -> PrefillPlan:
    """Pack left-padded prompts (first-fit, longest first) into as few rows as the steps allow.

    `same_as` [B] (default: every row its own) names for each row the row whose prompt it
    repeats, which names itself: such rows (the samples of one record) share that row's packed
    tokens, so the prompt is prefilled once. `row_multiple` keeps the packed row count
    divisible by the devices the batch is split over.
    """
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
    b, p = mask.shape
    lengths = mask.sum(axis=1).astype(np.int32)
    if np.any(lengths < 1) or not np.array_equal(
            mask, np.arange(p)[None, :] >= (p - lengths)[:, None]):
        raise ValueError("prompts must be left-padded with at least one real token per row "
                         "(mask 0...0 1...1); see left_pad")
    owner = np.arange(b) if same_as is None else np.asarray(same_as, np.int64)
    real = np.where(mask, ids, -1)  # padding ids take no part in the comparison
    if owner.shape != (b,) or np.any(owner[owner] != owner) or not np.array_equal(
            real[owner], real):
        raise ValueError("same_as must name, for each row, a row holding the same prompt that "
                         "names itself")
    distinct = np.flatnonzero(owner == np.arange(b))
    free: list[int] = []
    row = np.zeros(b, np.int32)
    start = np.zeros(b, np.int32)
    for i in distinct[np.argsort(-lengths[distinct], kind="stable")]:
        n = int(lengths[i])
        r = next((r for r, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(p)
        row[i], start[i] = r, p - free[r]
        free[r] -= n
    rows = step_rows(len(free), b, steps, row_multiple)
    packed = np.full((rows, p), pad_id, np.int32)
    segments = np.zeros((rows, p), np.int32)
    for i in distinct:
        n, r, c = int(lengths[i]), row[i], start[i]
        packed[r, c:c + n] = ids[i, p - n:]
        segments[r, c:c + n] = i + 1
    return PrefillPlan(packed, segments, row[owner], start[owner], lengths)
