"""Job settings: one frozen dataclass, separate from the model's hyperparameters.

Field names are the CLI option names with underscores, so a YAML preset, the click options and
Python callers all speak the same keys. Beam runner options are not here: they travel as
PipelineOptions arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

MODES = ("score", "generate")


def default_buckets(context: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the model's context (the context itself included)."""
    out, b = [], smallest
    while b < context:
        out.append(b)
        b *= 2
    return (*out, context)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything a score or generate job needs besides the Beam runner options."""

    mode: str = "score"  # "score" or "generate"
    input: str = ""  # file pattern (local path, gs://...), e.g. data/*.parquet
    output: str = ""  # output directory; errors go to <output>-errors
    model: str = "gpt2"  # Hub repo id or local Hugging Face checkpoint directory
    input_format: str | None = None  # "jsonl" or "parquet"; None = from the file extension
    output_format: str = "parquet"  # "parquet" or "jsonl"
    overwrite: bool = False  # replace a non-empty output location
    text_field: str = "text"  # score: the text to score (the continuation with context_field)
    context_field: str | None = None  # score: condition on this field, score text_field only
    prompt_field: str = "prompt"  # generate: the prompt
    id_field: str | None = None  # record id column; None = "<file>:<line or row>"
    keep_fields: tuple[str, ...] = ()  # input columns copied to the output
    dtype: str = "float32"  # compute dtype of matmuls: float32 or bfloat16 (scores stay float32)
    max_tokens_per_batch: int = 8192  # token budget per batch: rows = budget // bucket length
    bucket_boundaries: tuple[int, ...] | None = None  # padded lengths; None = powers of two
    tail_steps: int = 4  # a part-filled batch is padded to the next 1/tail_steps of the full
    # row count: at most tail_steps shapes per length; 1 = always full batches, one shape
    pack: bool = True  # score: pack several texts per row of the context's length (one shape,
    # little padding); off = one text per row, bucketed by length
    add_bos: bool = True  # score: prepend <|endoftext|> so the first token is scored too
    stride: int | None = None  # score: rolling-window stride past the context; None = window
    allow_empty: bool = False  # score: an empty text gives a row with 0 tokens, not an error
    max_new_tokens: int = 32  # generate
    temperature: float = 0.0  # generate: 0 = greedy
    top_k: int = 0  # generate: 0 = off
    top_p: float = 1.0  # generate: 1.0 = off
    seed: int = 0  # generate: with the record id, fixes each record's samples
    num_samples: int = 1  # generate: rows per prompt
    stop: tuple[str, ...] = ()  # generate: stop strings (the text is cut before them)
    progress: bool = True  # print a live progress line and a summary on stderr

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.output_format not in ("parquet", "jsonl"):
            raise ValueError("output_format must be 'parquet' or 'jsonl'")
        if self.input_format not in (None, "jsonl", "parquet"):
            raise ValueError("input_format must be 'jsonl' or 'parquet'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be 'float32' or 'bfloat16'")
        if self.max_tokens_per_batch < 1:
            raise ValueError("max_tokens_per_batch must be >= 1")
        if self.tail_steps < 1:
            raise ValueError("tail_steps must be >= 1")
        if self.bucket_boundaries is not None and (
                not self.bucket_boundaries or list(self.bucket_boundaries)
                != sorted(set(self.bucket_boundaries)) or self.bucket_boundaries[0] < 1):
            raise ValueError("bucket_boundaries must be increasing positive lengths")
        if self.stride is not None and self.stride < 1:
            raise ValueError("stride must be >= 1")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.mode == "score" and self.context_field == self.text_field:
            raise ValueError("context_field and text_field must differ")

    @property
    def source_field(self) -> str:
        """The field holding the text the job tokenizes first."""
        return self.prompt_field if self.mode == "generate" else self.text_field

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(JobConfig))


def load_preset(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML preset: (job option values, Beam pipeline arguments).

    Keys are JobConfig field names (dashes allowed); the key `beam` holds a mapping of Beam
    options (`runner: DataflowRunner`) or a list of `--flag=value` strings.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of option: value")
    beam = data.pop("beam", None) or {}
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            raise ValueError(f"config {path}: unknown option {key!r}")
        options[name] = value
    return options, beam_args(beam, path)


def beam_args(beam: Any, source: Any = "config") -> list[str]:
    """Turn a preset's `beam:` section into PipelineOptions command-line arguments."""
    if isinstance(beam, list):
        return [str(a) for a in beam]
    if not isinstance(beam, dict):
        raise ValueError(f"{source}: 'beam' must be a mapping or a list of --flag=value strings")
    args = []
    for key, value in beam.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif isinstance(value, list):
            args += [f"{flag}={v}" for v in value]
        else:
            args.append(f"{flag}={value}")
    return args
