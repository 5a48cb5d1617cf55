"""Generate mode: continuations of every prompt, one output row per sample.

A record becomes `num_samples` `GenerateItem`s; the model step returns one
`gpt2model.Generation` per item, and `row` builds the output row of the schema `FIELDS`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import apache_beam as beam
import pyarrow as pa

from gpt2model.generation import Generation, Sample
from pipeline.records import ERRORS, Record, RecordInfo, clean_str, with_kept_fields

FIELDS = [
    pa.field("id", pa.string()),
    pa.field("sample_index", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("finish_reason", pa.string()),
]


# Columns some settings add: --top-logprobs, --echo, --num-beams.
TOP_FIELDS = [pa.field("top_token_ids", pa.list_(pa.list_(pa.int32()))),
              pa.field("top_logprobs", pa.list_(pa.list_(pa.float32())))]
ECHO_FIELDS = [pa.field("prompt_token_logprobs", pa.list_(pa.float32()))]
BEAM_FIELDS = [pa.field("sequence_score", pa.float32())]


def schema(config: Any, keep_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a generate job's output (documented in the README)."""
    fields = (FIELDS + (TOP_FIELDS if config.top_logprobs else [])
              + (ECHO_FIELDS if config.sampling.echo else [])
              + (BEAM_FIELDS if config.num_beams > 1 else []))
    return with_kept_fields(fields, config.keep_fields, keep_types)


@dataclasses.dataclass(frozen=True)
class GenerateMeta(RecordInfo):
    """A prompt record's info for its rows: the prompt text as written to the output."""

    prompt: str = ""


@dataclasses.dataclass(frozen=True)
class GenerateItem:
    """One sample of one prompt."""

    key: str
    sample_index: int
    prompt_ids: tuple[int, ...]
    meta: GenerateMeta

    @property
    def length(self) -> int:
        return len(self.prompt_ids)

    @property
    def sample(self) -> Sample:
        """What the generator needs: the random stream is keyed by the record's id."""
        return Sample(self.meta.id, self.sample_index, self.prompt_ids)


def make_items(rec: Record, config: Any, tokenizer: Any, context: int):
    """A prompt record -> one GenerateItem per sample, or a tagged error."""
    ids = tokenizer.encode(rec.text)
    room = context - config.max_new_tokens
    if len(ids) > room:
        yield beam.pvalue.TaggedOutput(ERRORS, rec.error(
            f"prompt of {len(ids)} tokens leaves no room for max_new_tokens="
            f"{config.max_new_tokens} in the model's context of {context}"))
        return
    meta = GenerateMeta.of(rec, prompt=clean_str(rec.text))
    for s in range(config.num_samples):  # beam search: 1 item, num_return_sequences rows
        yield GenerateItem(rec.key, s, tuple(ids), meta)


def row(item: GenerateItem, generation: Generation) -> dict[str, Any]:
    """The output row of one generated sample."""
    out = {"id": item.meta.id, "sample_index": item.sample_index, "prompt": item.meta.prompt,
           "text": generation.text, "token_ids": generation.token_ids,
           "token_logprobs": generation.logprobs, "finish_reason": generation.finish_reason}
    for name, attr in (("top_token_ids", "top_token_ids"), ("top_logprobs", "top_logprobs"),
                       ("prompt_token_logprobs", "prompt_logprobs"),
                       ("sequence_score", "sequence_score")):
        value = getattr(generation, attr, None)
        if value is not None:  # set only with the settings that add the column
            out[name] = value
    out.update(item.meta.keep)
    return out


def tokens(row: dict[str, Any], config: Any) -> int:
    """The tokens a sample generated."""
    return len(row["token_ids"] or ())


def prepare(config: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The config a generate job runs with: --bad-words tokenized into the sampling's
    bad_words_ids (each word as written and with a leading space: GPT-2 spells a word after
    a space with other tokens), and every token id checked against the vocabulary."""
    words = []
    for word in config.bad_words:
        variants = {tuple(tokenizer.encode(word)), tuple(tokenizer.encode(" " + word))}
        if not word.strip() or not all(variants):
            raise ValueError(f"--bad-words {word!r} tokenizes to nothing")
        words += sorted(variants - set(words))
    if words:
        config = config.replace(bad_words_ids=tuple(config.sampling.bad_words_ids)
                                + tuple(w for w in words
                                        if w not in config.sampling.bad_words_ids))
    s = config.sampling
    ids = [("--stop-token-ids", t) for t in s.stop_token_ids] + [
        ("--logit-bias", t) for t, _ in s.logit_bias] + [
        ("bad_words_ids", t) for w in s.bad_words_ids for t in w]
    for option, token in ids:
        if not 0 <= token < vocab_size:
            raise ValueError(f"{option}: token id {token} is outside the model's vocabulary "
                             f"(0..{vocab_size - 1})")
    return config


# Batches' worth of samples a generation batch streams through one batch's rows (slots): a row
# whose sample ends takes the next waiting one, so rows stay busy until the batch runs dry.
STREAM_GROUPS = 4


def stream_groups(config: Any) -> int:
    """STREAM_GROUPS for the refilled-slot path; 1 for beam search and echo (fixed batches)."""
    return 1 if config.num_beams > 1 or config.sampling.echo else STREAM_GROUPS


def rows_per_record(config: Any) -> int:
    """Output rows one finished record gives: its samples, or its returned beams."""
    return config.num_return_sequences if config.num_beams > 1 else config.num_samples


def check_config(config: Any) -> None:
    """A generate job's own settings: beam search and what it combines with."""
    if config.num_beams < 1:
        raise ValueError("num_beams must be >= 1 (1 = no beam search)")
    if not 1 <= config.num_return_sequences <= config.num_beams:
        raise ValueError(f"num_return_sequences must be in 1..num_beams ({config.num_beams})"
                         f", got {config.num_return_sequences}")
    if config.num_beams == 1:
        if config.num_return_sequences != 1 or config.early_stopping or \
                config.length_penalty != 1.0:
            raise ValueError("length_penalty, early_stopping and num_return_sequences are "
                             "beam search settings: pass num_beams > 1")
        return
    s = config.sampling
    sampling = [n for n, on in (("temperature", s.temperature > 0), ("top_k", s.top_k),
                                ("top_p", s.top_p < 1.0), ("min_p", s.min_p))
                if on]
    if sampling:
        raise ValueError(f"beam search is deterministic: it does not combine with "
                         f"{', '.join(sampling)} (drop them, or num_beams)")
    unsupported = [n for n, on in (
        ("num_samples", config.num_samples != 1), ("stop", s.stop),
        ("stop_token_ids", s.stop_token_ids), ("repetition_penalty", s.repetition_penalty
                                               != 1.0),
        ("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty),
        ("no_repeat_ngram_size", s.no_repeat_ngram_size), ("min_new_tokens",
                                                           s.min_new_tokens),
        ("bad_words", config.bad_words or s.bad_words_ids), ("logit_bias", s.logit_bias),
        ("top_logprobs", config.top_logprobs), ("echo", s.echo)) if on]
    if unsupported:
        raise ValueError(f"beam search does not support {', '.join(unsupported)} yet "
                         "(num_return_sequences gives several rows per prompt)")
    if not math.isfinite(config.length_penalty):
        raise ValueError("length_penalty must be a finite number")
