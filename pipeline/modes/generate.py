"""Generate mode: continuations of every prompt, one output row per sample.

A record becomes `num_samples` `GenerateItem`s; the model step returns one
`gpt2model.Generation` per item, and `row` builds the output row of the schema `FIELDS`.
"""

from __future__ import annotations

import dataclasses
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


def schema(config: Any, keep_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a generate job's output (documented in the README)."""
    return with_kept_fields(FIELDS, config.keep_fields, keep_types)


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
    for s in range(config.num_samples):
        yield GenerateItem(rec.key, s, tuple(ids), meta)


def row(item: GenerateItem, generation: Generation) -> dict[str, Any]:
    """The output row of one generated sample."""
    out = {"id": item.meta.id, "sample_index": item.sample_index, "prompt": item.meta.prompt,
           "text": generation.text, "token_ids": generation.token_ids,
           "token_logprobs": generation.logprobs, "finish_reason": generation.finish_reason}
    out.update(item.meta.keep)
    return out


def tokens(row: dict[str, Any], config: Any) -> int:
    """The tokens a sample generated."""
    return len(row["token_ids"] or ())
