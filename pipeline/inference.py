"""Beam `ModelHandler`s for `RunInference`: our model step inside a user's own pipeline.

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from pipeline import GPT2ScoringModelHandler

    with beam.Pipeline() as p:
        (p | beam.Create(["The Manhattan bridge", "Once upon a time"])
           | RunInference(GPT2ScoringModelHandler("gpt2"))
           | beam.Map(lambda r: (r.example, r.inference.perplexity)))

Each `PredictionResult.inference` is a `ScoreResult` or `GenerationResult` whose field names are
the job's output columns. The batches Beam forms (`BatchElements`, weighed by their tokens:
`element_size_fn` against `min_batch_size`/`max_batch_size` in tokens) are packed and scored by
the same code as our jobs' model step (`pipeline.handler.ScoreBatches` / `GenerateBatches`:
fixed shapes, split-and-retry on a failed model call), so numbers equal the job's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipeline.config import DEFAULT_BATCH_TOKENS, JobConfig

# Beam batches hold this many model batches' worth of tokens: each Beam batch is packed on its
# own and its last model batch is part-filled, so a Beam batch of one model batch wasted up to
# half its compute (BENCHMARKS.md, workload 14).
MODEL_BATCHES_PER_BEAM_BATCH = 4


class TokenCount:
    """Beam's `element_size_fn`: an element's tokens, counted by the model's own tokenizer
    (loaded on first use, on the worker), so a batch's weight is what the model step packs.
    A dict element counts its string fields."""

    def __init__(self, model: str):
        self.model = model
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "_tokenizer": None}

    def __call__(self, element: Any) -> int:
        if self._tokenizer is None:
            from pipeline.transforms import job_tokenizer

            self._tokenizer = job_tokenizer(self.model)
        texts = [element] if isinstance(element, str) else [
            v for v in element.values() if isinstance(v, str)]
        return max(1, sum(len(ids) for ids in self._tokenizer.encode_batch(texts)))


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """One scored text: the score job's columns (`error` set instead when the model call
    failed for it even alone; the numbers are then None)."""

    id: str
    num_tokens: int | None = None
    token_ids: list[int] | None = None
    token_logprobs: list[float | None] | None = None
    sum_logprob: float | None = None
    mean_logprob: float | None = None
    perplexity: float | None = None
    bits_per_byte: float | None = None
    greedy: list[bool] | None = None
    is_greedy: bool | None = None
    top_token_ids: list | None = None
    top_logprobs: list | None = None
    entropy: list | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One generated sample: the generate job's columns (`error` when its decode failed)."""

    id: str
    sample_index: int
    prompt: str
    text: str | None = None
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None
    finish_reason: str | None = None
    error: str | None = None


class _GPT2Handler(ModelHandler):
    """Shared by both handlers: settings as a JobConfig, the model loaded once per process."""

    mode = "score"

    def __init__(self, model: str, *, dtype: str = "float32",
                 max_tokens_per_batch: int | None = None,
                 share_across_processes: bool = False, min_batch_size: int | None = None,
                 max_batch_size: int | None = None, max_batch_duration_secs: int | None = None,
                 **settings: Any):
        """`model`: Hub id or checkpoint directory (with `revision=`, a Hub model is pinned to
        the commit it resolves to now, so every worker loads the same files); `settings`: the
        job options of this mode (e.g. `context_field`, `stride`, `top_logprobs` for scoring;
        `max_new_tokens`, `temperature`, `seed`, `num_samples` for generation).

        `max_tokens_per_batch` is the model call's budget, as in the jobs (None: the worker's
        backend default, `JobConfig.batch_token_budget`). Beam's batches (`BatchElements`)
        are weighed in tokens by `TokenCount`; `min_batch_size` and `max_batch_size` are token
        counts; max defaults to MODEL_BATCHES_PER_BEAM_BATCH x `max_tokens_per_batch` (x
        DEFAULT_BATCH_TOKENS when that is None: the launcher cannot know the workers'
        backend) and min to max: fixed-size batches, where Beam's adaptive sizing would start
        at one element (each a padded model call). `max_batch_duration_secs`: as Beam's."""
        from pipeline.jobs import pin_model

        config = JobConfig(mode=self.mode, model=model, dtype=dtype, progress=False,
                           max_tokens_per_batch=max_tokens_per_batch, **settings)
        self.config, _ = pin_model(config)
        self._share = share_across_processes
        max_size = max_batch_size or MODEL_BATCHES_PER_BEAM_BATCH * (
            max_tokens_per_batch or DEFAULT_BATCH_TOKENS)
        # Beam 2.77's ModelHandler takes max_batch_weight but its BatchElements refuses it;
        # BatchElements does weigh elements by element_size_fn against max_batch_size, which
        # makes the batch limit a token budget.
        super().__init__(min_batch_size=min_batch_size or max_size, max_batch_size=max_size,
                         max_batch_duration_secs=max_batch_duration_secs,
                         element_size_fn=TokenCount(self.config.model))

    def load_model(self):
        from pipeline.handler import LoadedModel

        return LoadedModel(self.config.model, self.config.dtype)

    def share_model_across_processes(self) -> bool:
        return self._share

    def _step(self, step_cls: type, model):
        """The jobs' model-step DoFn, used as a plain object around an already loaded model."""
        step = step_cls(self.config, handle=None)
        step.model = model
        step.progress, step._reported_load = None, True
        return step

    def _records(self, batch: Sequence[Any]) -> list:
        """Elements -> validated Records (a dict with the configured fields, or a string)."""
        from pipeline.formats import SourceRecord
        from pipeline.transforms import ParseRecords

        parse = ParseRecords(self.config)
        out = []
        for i, element in enumerate(batch):
            value = element if isinstance(element, dict) else {self.config.source_field: element}
            parsed = list(parse.process(SourceRecord("element", i, value, None, None)))
            out.append(parsed[0])
        return out


class GPT2ScoringModelHandler(_GPT2Handler):
    """RunInference over strings (or dicts with `text_field`, and `context_field` for pairs)
    -> PredictionResult(element, ScoreResult): per-token log-probs, as `gpt2-pipeline score`."""

    mode = "score"

    def run_inference(self, batch: Sequence[Any], model, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        from gpt2model.batching import RowPacker
        from pipeline import modes
        from pipeline.handler import ScoreBatches
        from pipeline.modes import score as score_mode
        from pipeline.records import Record
        from pipeline.transforms import rows_for

        cfg, context = self.config, model.config.n_positions
        step = self._step(ScoreBatches, model)
        mode = modes.for_config(cfg)
        results: dict[int, Any] = {}
        parts: dict[str, list] = {}
        packer = RowPacker(context, rows_for(context, cfg))
        batches = []
        for i, rec in enumerate(self._records(batch)):
            if not isinstance(rec, Record):
                results[i] = ScoreResult(id=str(i), error=rec.value["reason"])
                continue
            for item in mode.make_items(rec, cfg, model.tokenizer, context):
                if hasattr(item, "tag"):  # a tagged error or empty text
                    value = item.value
                    results[i] = ScoreResult(**score_mode.empty_row(value, cfg)) \
                        if item.tag == "empty" else ScoreResult(id=str(i),
                                                               error=value["reason"])
                    continue
                batches += packer.add(item, item.length)
        batches += packer.flush()
        for rows in batches:
            for part in step._score(context, rows):
                parts.setdefault(part.key, []).append(part)
        for key, got in parts.items():
            i = int(key.rsplit(":", 1)[1])
            failed = next((p for p in got if p.error), None)
            if failed is not None:
                results[i] = ScoreResult(id=str(i), error=failed.error)
                continue
            merged = got[0] if len(got) == 1 else score_mode.merge_parts((key, got))
            results[i] = ScoreResult(**mode.row(merged, cfg))
        return [PredictionResult(element, results[i]) for i, element in enumerate(batch)]


class GPT2GenerationModelHandler(_GPT2Handler):
    """RunInference over prompt strings (or dicts with `prompt_field`) ->
    PredictionResult(element, [GenerationResult per sample]), as `gpt2-pipeline generate`."""

    mode = "generate"

    def run_inference(self, batch: Sequence[Any], model, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        from pipeline.handler import GenerateBatches
        from pipeline.modes import generate as generate_mode
        from pipeline.records import Record
        from pipeline.transforms import BucketBatch

        cfg, context = self.config, model.config.n_positions
        step = self._step(GenerateBatches, model)
        results: dict[int, list] = {i: [] for i in range(len(batch))}
        bucketer = BucketBatch(cfg, context, cfg.max_new_tokens)
        bucketer.start_bundle()
        batches = []
        for i, rec in enumerate(self._records(batch)):
            if not isinstance(rec, Record):
                results[i].append(GenerationResult(id=str(i), sample_index=0, prompt="",
                                                   error=rec.value["reason"]))
                continue
            for item in generate_mode.make_items(rec, cfg, model.tokenizer, context):
                if hasattr(item, "tag"):
                    results[i].append(GenerationResult(id=str(i), sample_index=0,
                                                       prompt=rec.text,
                                                       error=item.value["reason"]))
                    continue
                batches += list(bucketer.process(item))
        batches += [wv.value for wv in bucketer.finish_bundle()]
        for length, items in batches:
            for out in step._generate(length, items):
                if hasattr(out, "tag"):  # failed even alone
                    e = out.value
                    results[e["line"]].append(GenerationResult(
                        id=e["id"], sample_index=0, prompt=e["raw"] or "", error=e["reason"]))
                    continue
                item, generation = out
                results[item.meta.index].append(
                    GenerationResult(**generate_mode.row(item, generation)))
        return [PredictionResult(element, sorted(results[i], key=lambda g: g.sample_index))
                for i, element in enumerate(batch)]
