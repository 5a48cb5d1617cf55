"""The model step: load once per worker process, shard batches over the worker's devices.

The model (params, tokenizer, jitted scorer/generator) lives in an `apache_beam.utils.shared`
handle, so every DoFn instance and thread of a process reuses one copy, loaded in `setup()`.
Sharding is declared once here: a 1-D `Mesh` over the local devices, params replicated, the batch
split on its leading axis (rows padded to a multiple of the device count).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
import jax
import jax.numpy as jnp
import numpy as np
from apache_beam.utils import shared
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2model.batching import pack_branched_rows
from pipeline import metrics
from pipeline.config import JobConfig
from pipeline.formats import one_line
from pipeline.metrics import counter, distribution
from pipeline.modes.score import PartScores
from pipeline.progress import register
from pipeline.records import ERRORS, error_row
from pipeline.transforms import job_tokenizer, padded_rows, rows_for

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DataParallel:
    """The one place that knows how many devices there are."""

    def __init__(self, devices: list | None = None):
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))

    @property
    def size(self) -> int:
        return len(self.devices)

    def rows(self, rows: int) -> int:
        """Round a batch's row count up to a multiple of the device count."""
        return -(-rows // self.size) * self.size

    def put_params(self, params: Any) -> Any:
        return jax.device_put(params, self.replicated)

    def put_batch(self, *arrays: np.ndarray | None) -> tuple[jax.Array | None, ...]:
        """Each array split by rows over the devices; None (an absent input) stays None."""
        return tuple(None if a is None else jax.device_put(a, self.batch) for a in arrays)


def use_compilation_cache(directory: str | None) -> None:
    """Keep XLA's compiled programs in `directory` (JAX's persistent compilation cache), so the
    next process running the same shapes loads them instead of compiling; None: off.

    Every program is cached however fast it compiled (JAX's default skips those under 1 s, which
    on a small model is all of them). First setting wins: JAX fixes the cache at its first
    compile in a process. Programs compiled for this CPU's instruction set go in a
    subdirectory named after it: a home directory shared by machines of other CPU kinds (AVX2
    only vs AVX-512) must not hand one the other's code."""
    if not directory:
        return
    path = os.path.join(os.path.expanduser(directory), _host_fingerprint())
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _host_fingerprint() -> str:
    """JAX's version and this CPU's feature flags, hashed: what a cached program depends on
    beyond JAX's own cache key."""
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
    return f"jax{jax.__version__}-{platform.machine()}-{digest}"


class LoadedModel:
    """Everything the model step needs, built once per process (weakref-able for Shared)."""

    def __init__(self, model: str, dtype: str, compilation_cache: str | None = None):
        from gpt2model import Generator, Scorer, from_pretrained
        from gpt2model.model import compute_params

        use_compilation_cache(compilation_cache)
        start = time.perf_counter()
        self.parallel = DataParallel()
        self.config, params = from_pretrained(model)
        # Cast once here so the scorer and the generator share one copy of the weights.
        params = compute_params(self.parallel.put_params(params), DTYPES[dtype])
        self.tokenizer = job_tokenizer(model)
        self.scorer = Scorer(self.config, params, dtype=DTYPES[dtype])
        self.generator = Generator(self.config, params, self.tokenizer, dtype=DTYPES[dtype],
                                   put_batch=self.parallel.put_batch,
                                   row_multiple=self.parallel.size)
        self.load_ms = int((time.perf_counter() - start) * 1000)

    @property
    def compile_count(self) -> int:
        return self.scorer.compile_count + self.generator.compile_count


class _ModelStep(beam.DoFn):
    def __init__(self, config: JobConfig, handle: shared.Shared, total: int | None = None,
                 run_id: str | None = None, total_bytes: int | None = None):
        """total: input records when known; run_id/total_bytes: the run's progress (None: no
        progress shown)."""
        self.config = config
        self.handle = handle
        self.total = total
        self.run_id = run_id
        self.total_bytes = total_bytes
        self.batches = counter(metrics.BATCHES)
        self.tokens = counter(metrics.TOKENS)
        self.padded = counter(metrics.PADDED_TOKENS)
        self.real = counter(metrics.INPUT_TOKENS)
        self.compiles = counter(metrics.COMPILES)
        self.latency = distribution(metrics.BATCH_LATENCY_MS)
        self.load_ms = distribution(metrics.MODEL_LOAD_MS)
        self.errors = counter(metrics.ERRORS)
        self.model_failures = counter(metrics.MODEL_FAILURES)

    def setup(self) -> None:
        cfg = self.config
        self.model: LoadedModel = self.handle.acquire(
            lambda: LoadedModel(cfg.model, cfg.dtype, cfg.compilation_cache),
            tag=f"{cfg.model}|{cfg.dtype}")
        self.progress = (register(self.run_id, self.total_bytes, self.total)
                         if cfg.progress and self.run_id else None)
        self._reported_load = False

    def _account(self, start: float, compiles_before: int, rows: int, length: int,
                 tokens: int, records: int) -> None:
        if not self._reported_load:
            self.load_ms.update(self.model.load_ms)
            self._reported_load = True
        self.batches.inc()
        self.tokens.inc(tokens)
        self.padded.inc(rows * length)
        self.compiles.inc(self.model.compile_count - compiles_before)
        self.latency.update(int((time.perf_counter() - start) * 1000))
        if self.progress is not None:
            self.progress.add(records, tokens)


class ScoreBatches(_ModelStep):
    """(length, rows of ScoreItems) -> PartScores per item, scored in one fixed-shape call.

    A row holds one item (bucketed batches) or several packed ones; either way the batch is
    [padded_rows, length] (rounded up to the device count): a full batch, or a part-filled one
    padded to the next step of --tail-steps, so each length compiles at most tail_steps times.
    """

    def process(self, batch):
        length, rows = batch
        yield from self._score(length, rows)

    def _score(self, length: int, rows: list):
        """Score `rows`; if the model call fails, split the batch in halves (a packed row into
        its items) and retry, down to one item, which then fails alone as an error part."""
        try:
            results = list(self._score_once(length, rows))
        except Exception as err:  # a device error: OOM on a long batch, an XLA failure, ...
            if len(rows) == 1 and len(rows[0]) == 1:
                it = rows[0][0]
                self.model_failures.inc()
                yield PartScores(it.key, it.part, it.parts, 0, np.zeros(0, np.float32),
                                 np.zeros(0, bool), it.meta, error=failure_reason(
                                     err, 1, length))
                return
            for half in split_batch(rows):
                yield from self._score(length, half)
            return
        yield from results

    def _score_once(self, length: int, rows: list):
        cfg = self.config
        start, before = time.perf_counter(), self.model.compile_count
        n_rows = self.model.parallel.rows(padded_rows(len(rows), length, cfg))
        if FAULT_HOOK is not None:
            FAULT_HOOK([it for row in rows for it in row], length)
        ids, tgt, seg, branch, pos, offsets = pack_branched_rows(
            [[it.window for it in row] for row in rows], length, n_rows)
        # Each item's scored positions in its row: marked for the model (the LM head skips the
        # rest: a rolling window's context, a shared multiple-choice context, padding) and read
        # back below.
        placed = [(r, it, [slice(at + lo, at + hi) for lo, hi in it.window.spans])
                  for r, row in enumerate(rows) for it, at in zip(row, offsets[r], strict=True)]
        wanted = np.zeros_like(seg)
        for r, _, spans in placed:
            for s in spans:
                wanted[r, s] = 1
        arrays = (ids, tgt, seg) + ((branch, pos) if cfg.choices_field else (None, None))
        *arrays, wanted = self.model.parallel.put_batch(*arrays, wanted)
        out = jax.device_get(self.model.scorer(
            *arrays, scored=wanted, top_logprobs=cfg.top_logprobs or 0, entropy=cfg.entropy))
        lp, gr = out[0], out[1]
        extra = out[2] if len(out) > 2 else None
        scored = records = 0
        results = []
        for r, it, spans in placed:
            scored += it.window.num_scored
            records += it.part == it.parts - 1
            results.append(PartScores(
                it.key, it.part, it.parts, getattr(it.window, "target_offset", 0),
                np.concatenate([lp[r, s] for s in spans]),
                np.concatenate([gr[r, s] for s in spans]), it.meta,
                None if extra is None else
                {k: np.concatenate([v[r, s] for s in spans]) for k, v in extra.items()}))
        self.real.inc(int(np.count_nonzero(seg)))
        self._account(start, before, n_rows, length, scored, records)
        return results


class GenerateBatches(_ModelStep):
    """(prompt length, [GenerateItem]) -> (item, Generation) pairs, decoded in the batch's rows
    as refilled slots (`Generator.run_stream`; `run_batch` with echo, beam search with beams);
    a sample whose decode fails even alone becomes an error row (tagged `errors`)."""

    def process(self, batch):
        length, items = batch
        yield from self._generate(length, items)

    def _generate(self, length: int, items: list):
        try:
            results = self._generate_once(length, items)
        except Exception as err:  # a device error; halves retried, a lone sample fails alone
            if len(items) == 1:
                it = items[0]
                self.errors.inc()
                self.model_failures.inc()
                row = error_row(it.meta.source, it.meta.index, it.meta.id,
                                f"sample {it.sample_index}: "
                                f"{failure_reason(err, 1, length + self.config.max_new_tokens)}",
                                it.meta.prompt)
                # One sample of the record failed, the others may not have: per-item output
                # counts the record done when all its samples are (pipeline.resume).
                row["sample_index"] = it.sample_index
                yield beam.pvalue.TaggedOutput(ERRORS, row)
                return
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                yield from self._generate(length, part)
            return
        yield from results

    def _generate_once(self, length: int, items: list) -> list:
        cfg = self.config
        start, before = time.perf_counter(), self.model.compile_count
        # A streamed batch holds up to STREAM_GROUPS batches' samples: its rows are slots.
        full = rows_for(length, cfg, cfg.max_new_tokens)
        rows = self.model.parallel.rows(
            padded_rows(min(len(items), full), length, cfg, cfg.max_new_tokens))
        if FAULT_HOOK is not None:
            FAULT_HOOK(items, length)
        gen = self.model.generator
        samples = [it.sample for it in items]
        if cfg.num_beams > 1:
            results, rows = self._beam_search(length, items, rows)
        elif cfg.sampling.echo:  # prompt log-probs come from run_batch's prefill
            results = list(zip(items, gen.run_batch(
                samples, cfg.sampling, seed=cfg.seed, length=length, rows=rows), strict=True))
        else:  # the rows as slots; a batch holding more samples than rows refills them
            results = list(zip(items, gen.run_stream(
                samples, cfg.sampling, seed=cfg.seed, slots=rows, prompt_length=length),
                strict=True))
        produced = sum(len(g.token_ids) for _, g in results)
        self._account(start, before, rows, length + cfg.max_new_tokens, produced,
                      sum(1 for it in items if it.sample_index == cfg.num_samples - 1))
        return results

    def _beam_search(self, length: int, items: list, rows: int) -> tuple[list, int]:
        """Beam search of each item's prompt: num_return_sequences (item, Generation) pairs
        per item, sample_index = the hypothesis' rank; and the rows computed (x beams)."""
        from gpt2model.beam_search import BeamSettings, beam_search
        from gpt2model.generation import FINISH_EOS, FINISH_LENGTH, Generation

        cfg = self.config
        gen = self.model.generator
        settings = BeamSettings(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                length_penalty=cfg.length_penalty,
                                early_stopping=cfg.early_stopping,
                                num_return_sequences=cfg.num_return_sequences)
        # The batch budget covers rows x beams: prompts per call shrink by the beam count.
        per_call = self.model.parallel.rows(max(1, rows // cfg.num_beams))
        out = []
        for at in range(0, len(items), per_call):
            chunk = items[at:at + per_call]
            found = beam_search(gen.config, gen.params, [it.sample.prompt_ids for it in chunk],
                                settings, gen.eos_id, gen.model.dtype, prompt_length=length,
                                batch_size=per_call)
            for it, hypotheses in zip(chunk, found, strict=True):
                for rank, h in enumerate(hypotheses):
                    ids = list(h.token_ids)
                    reason = FINISH_LENGTH if len(ids) >= cfg.max_new_tokens else FINISH_EOS
                    g = Generation(ids, gen.tokenizer.decode(ids), None, reason)
                    g.sequence_score = float(h.sequence_score)
                    out.append((dataclasses.replace(it, sample_index=rank), g))
        return out, -(-len(items) // per_call) * per_call * cfg.num_beams


# Test-only: when set, called with a batch's items and length before its model call; raising
# makes that call fail the way a device error would (the model itself is never replaced).
FAULT_HOOK: Callable[[list, int], None] | None = None


# How a model-call error row's reason starts (after a generate row's "sample N: "); the job
# finds such rows by these words (jobs._first_model_failure).
OUT_OF_MEMORY = "out of memory at"
MODEL_CALL_FAILED = "model call failed at"


def failure_reason(err: BaseException, rows: int, length: int) -> str:
    """Why a model call failed, for the error row: `out of memory at 1 x 1024 tokens` or the
    error's first line."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return f"{OUT_OF_MEMORY} {rows} x {length} tokens"
    return f"{MODEL_CALL_FAILED} {rows} x {length} tokens: {one_line(err)}"


def split_batch(rows: list[list]) -> list[list[list]]:
    """Halves of a batch of rows; a single packed row splits into one row per item."""
    if len(rows) == 1:
        return [[[it] for it in rows[0][: len(rows[0]) // 2]],
                [[it] for it in rows[0][len(rows[0]) // 2:]]]
    half = len(rows) // 2
    return [rows[:half], rows[half:]]
