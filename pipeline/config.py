"""Job settings: one frozen dataclass holding a SamplingConfig, plus YAML presets.

Field names are the CLI option names with underscores, so a YAML preset, the click options and
Python callers all speak the same keys. Sampling settings live in `gpt2model.SamplingConfig`
(`JobConfig.sampling`), declared once; they are also accepted and readable flat
(`JobConfig(temperature=0.7).temperature`), since presets and the CLI have one flat namespace.
Beam runner options are not here: they travel as PipelineOptions arguments.

Preset values are checked and converted by the type of the field they set (`coerce`), so a new
field needs no new parsing code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from gpt2model.batching import CPU_STEP_TOKENS, step_token_budget
from gpt2model.config import SamplingConfig
from pipeline import formats
from pipeline.modes import MODES

OUTPUT_FORMATS = ("parquet", "jsonl")  # pipeline.writers.OUTPUT_FORMATS, without importing Beam
DTYPES = ("float32", "bfloat16")
MAX_TOP_LOGPROBS = 20  # as vLLM's logprobs limit; more makes rows large for little use
# A tuple field with this metadata also takes one comma-separated string ("a,b"), the CLI's
# syntax; other tuple fields take a string as one item (stop strings may hold commas).
COMMA_SEPARATED = {"comma_separated": True}


def default_buckets(context: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the model's context (the context itself included)."""
    out, b = [], smallest
    while b < context:
        out.append(b)
        b *= 2
    return (*out, context)


# Where compiled programs persist by default: a second run of a job compiles nothing.
DEFAULT_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "gpt2-pipeline", "xla")

# Sampling settings given flat; a name JobConfig has too (top_logprobs: score and generate
# both take --top-logprobs) is JobConfig's, copied into the sampling of a generate job.
_SHARED_NAMES = ("top_logprobs",)
_SAMPLING_NAMES = tuple(f.name for f in dataclasses.fields(SamplingConfig)
                        if f.name not in _SHARED_NAMES)


# Token budgets of a batch when a job names none (JobConfig.batch_token_budget).
DEFAULT_BATCH_TOKENS = 8192
CPU_SCORE_BATCH_TOKENS = CPU_STEP_TOKENS


@dataclasses.dataclass(frozen=True, init=False)
class JobConfig:
    """Everything a score or generate job needs besides the Beam runner options."""

    mode: str = "score"  # one of pipeline.modes.MODES
    input: str = ""  # file pattern (local path, gs://...), e.g. data/*.parquet
    output: str = ""  # output directory; errors go to <output>-errors
    model: str = "gpt2"  # Hub repo id or local Hugging Face checkpoint directory
    revision: str | None = None  # Hub models: branch, tag or commit; None = the main branch
    input_format: str | None = None  # a pipeline.formats name; None = from the file suffix
    output_format: str = "parquet"  # "parquet" or "jsonl"
    overwrite: bool = False  # replace a non-empty output location
    resume: bool = False  # keep the work items an interrupted run of these settings completed
    text_field: str = "text"  # score: the text to score (the continuation with context_field)
    context_field: str | None = None  # score: condition on this field, score text_field only
    prompt_field: str = "prompt"  # generate: the prompt
    id_field: str | None = None  # record id column; None = "<file>:<line or row>"
    keep_fields: tuple[str, ...] = dataclasses.field(default=(), metadata=COMMA_SEPARATED)
    # input columns copied to the output
    dtype: str = "float32"  # compute dtype of matmuls: float32 or bfloat16 (scores stay float32)
    max_tokens_per_batch: int | None = None  # token budget per batch: rows = budget // bucket
    # length; None = by the backend the model runs on (JobConfig.batch_token_budget)
    bucket_boundaries: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata=COMMA_SEPARATED)  # padded lengths; None = powers of two
    tail_steps: int = 4  # a part-filled batch is padded to the next 1/tail_steps of the full
    # row count: at most tail_steps shapes per length; 1 = always full batches, one shape
    pack: bool = True  # score: pack several texts per row of the context's length (one shape,
    # little padding); off = one text per row, bucketed by length
    add_bos: bool = True  # score: prepend <|endoftext|> so the first token is scored too
    stride: int | None = None  # score: rolling-window stride past the context; None = window
    allow_empty: bool = False  # score: an empty text gives a row with 0 tokens, not an error
    choices_field: str | None = None  # score: multiple choice; a list of continuations of
    # context_field, one row per record with each choice's log-likelihood and the prediction
    label_field: str | None = None  # score: index of the right choice (accuracy)
    target_delimiter: str = ""  # score: put before each choice when scoring it, not counted in
    # its length (lm-eval's target_delimiter; its tasks use " ")
    top_logprobs: int | None = None  # score: the K (1..20) most likely tokens per position
    entropy: bool = False  # score: entropy of the next-token distribution per position
    summary_only: bool = False  # score: drop the per-token list columns
    by: str = "perplexity"  # filter: the value buckets are cut on (see modes.filter.BY)
    max_value: float | None = None  # filter: keep records whose value is <= this
    min_value: float | None = None  # filter: keep records whose value is >= this
    quantiles: tuple[float, ...] = dataclasses.field(default=(), metadata=COMMA_SEPARATED)
    # filter: cut points at these fractions of this corpus (per group), e.g. 0.3,0.7
    bucket_names: tuple[str, ...] = dataclasses.field(default=(), metadata=COMMA_SEPARATED)
    # filter: one more name than quantiles, lowest values first; default q0, q1, ...
    group_field: str | None = None  # filter: cut points per value of this field
    thresholds_from: str | None = None  # filter: apply the rule of an earlier filter output
    score_prefix: str = "lm_"  # filter: prefix of the appended score columns
    sampling: SamplingConfig = SamplingConfig()  # generate: how continuations are chosen
    seed: int = 0  # generate: with the record id, fixes each record's samples
    num_samples: int = 1  # generate: rows per prompt
    # generate: words never generated, each as given and with a leading space (-> the sampling's
    # bad_words_ids, tokenized when the job starts)
    bad_words: tuple[str, ...] = dataclasses.field(default=(), metadata=COMMA_SEPARATED)
    num_beams: int = 1  # generate: beam search with this many beams; 1 = greedy/sampling
    length_penalty: float = 1.0  # beam search: score = sum logprob / length ** this
    early_stopping: bool = False  # beam search: stop a prompt once num_beams hypotheses end
    num_return_sequences: int = 1  # beam search: rows per prompt, best first (<= num_beams)
    progress: bool = True  # print a live progress line and a summary on stderr
    # XLA programs kept here between runs (JAX's persistent compilation cache); None = off
    compilation_cache: str | None = DEFAULT_COMPILATION_CACHE
    report: bool = False  # write <output>/report.html (gpt2-pipeline report) after the job

    def __init__(self, **values: Any) -> None:
        """Keyword arguments only: the fields above, and SamplingConfig's fields given flat."""
        flat = {name: values.pop(name) for name in _SAMPLING_NAMES if name in values}
        sampling = values.pop("sampling", SamplingConfig())
        if isinstance(sampling, dict):  # e.g. a config read back from dataclasses.asdict JSON
            sampling = SamplingConfig(**{k: coerce(k, v) for k, v in sampling.items()})
        if not isinstance(sampling, SamplingConfig):
            raise TypeError("sampling must be a gpt2model.SamplingConfig or a mapping")
        values["sampling"] = dataclasses.replace(sampling, **flat) if flat else sampling
        for f in dataclasses.fields(self):
            value = values.pop(f.name, f.default)
            # Every list-like field is a tuple (hashable, immutable); a list (JSON) is taken too.
            object.__setattr__(self, f.name, tuple(value) if isinstance(value, list) else value)
        if values:
            raise TypeError(f"JobConfig got unknown option(s): {', '.join(sorted(values))}")
        if self.mode == "generate":
            shared = {n: getattr(self, n) or 0 for n in _SHARED_NAMES
                      if hasattr(self.sampling, n)}
            object.__setattr__(self, "sampling", dataclasses.replace(self.sampling, **shared))
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the flat names of the sampling settings.
        sampling = self.__dict__.get("sampling")
        if sampling is not None and name in _SAMPLING_NAMES:
            return getattr(sampling, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def batch_token_budget(self) -> int:
        """The token budget of one model batch: `max_tokens_per_batch`, or the default for the
        backend JAX runs on here.

        Resolved where batches are made (the workers), not at launch: a Dataflow launcher is a
        CPU machine whose workers may hold GPUs. On CPU, scoring runs in batches of
        CPU_SCORE_BATCH_TOKENS: a smaller step keeps its activations in cache and runs faster
        per token (BENCHMARKS.md, "Design measurements"); generation keeps the large budget,
        since its decode steps read every weight once per step whatever the row count.
        """
        if self.max_tokens_per_batch is not None:
            return self.max_tokens_per_batch
        if self.mode == "generate":
            return DEFAULT_BATCH_TOKENS
        return step_token_budget() or DEFAULT_BATCH_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.input_format is not None and self.input_format not in formats.names():
            raise ValueError(f"input_format must be one of {', '.join(formats.names())}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
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
        if self.top_logprobs is not None and not 1 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 1..{MAX_TOP_LOGPROBS}")
        if self.choices_field is not None:
            if not self.context_field:
                raise ValueError("choices_field needs context_field: the choices are scored "
                                 "as continuations of each record's context")
            if self.choices_field == self.context_field:
                raise ValueError("choices_field and context_field must differ")
            if self.top_logprobs is not None or self.entropy:
                raise ValueError("top_logprobs and entropy are per-token columns; a multiple-"
                                 "choice row has none (score the pairs without choices_field)")
        if self.label_field is not None and self.choices_field is None:
            raise ValueError("label_field needs choices_field")
        if self.mode in ("filter", "generate"):  # the mode's own settings, checked there
            import importlib

            importlib.import_module(f"pipeline.modes.{self.mode}").check_config(self)

    @property
    def source_field(self) -> str:
        """The field holding the text the job tokenizes first."""
        if self.mode == "generate":
            return self.prompt_field
        return self.context_field if self.choices_field else self.text_field

    def replace(self, **changes: Any) -> JobConfig:
        """A copy with `changes` (flat sampling names allowed)."""
        return dataclasses.replace(self, **changes)


def _option_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Flat option name -> (dataclass field, resolved type), JobConfig's then SamplingConfig's."""
    out = {}
    for cls in (JobConfig, SamplingConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "sampling" and f.name not in out:  # a shared name is JobConfig's
                out[f.name] = (f, hints[f.name])
    return out


OPTION_FIELDS = _option_fields()
FIELD_NAMES = tuple(OPTION_FIELDS)


def defaults() -> dict[str, Any]:
    """Every flat option's default value."""
    base = JobConfig()
    return {name: getattr(base, name) for name in FIELD_NAMES}


def coerce(name: str, value: Any) -> Any:
    """Check and convert one preset value to the type of the option field `name`.

    Driven by the field's annotation: bool, int, float, str, `X | None` (null allowed), and
    `tuple[X, ...]` (a YAML list; a string is one item, or comma-separated items for fields
    marked COMMA_SEPARATED). Raises a one-line ValueError naming the option.
    """
    if name not in OPTION_FIELDS:
        raise ValueError(f"unknown job option {name!r}")
    field, hint = OPTION_FIELDS[name]
    return _coerce(hint, value, f"config option {name!r}", field.metadata)


def _coerce(hint: Any, value: Any, where: str, metadata: Any) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where, metadata)
    if where == "config option 'logit_bias'" and isinstance(value, str | dict):
        value = parse_logit_bias(value)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is not Ellipsis:
        # A fixed pair, e.g. (token id, bias): a 2-item list.
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"{where}: {value!r} is not a pair")
        return tuple(_coerce(a, v, where, {}) for a, v in zip(args, value, strict=True))
    if typing.get_origin(hint) is tuple and typing.get_origin(args[0]) is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list of lists")
        return tuple(_coerce(args[0], v, where, {}) for v in value)
    if typing.get_origin(hint) is tuple:
        item = args[0]
        # Numbers never hold commas: a list of them may always be given comma-separated.
        comma = metadata.get("comma_separated", False) or item in (int, float)
        if isinstance(value, str):
            value = split_list(value) if comma else [value]
        elif not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list" + (" or a comma-separated string"
                                                          if comma else f" of {item.__name__}"))
        out = []
        for v in value:
            # Items of a comma-separated string are text: "16" is the integer 16 there.
            got = _scalar(item, _number(item, v) if isinstance(v, str) else v)
            if got is _BAD:
                raise ValueError(f"{where}: {v!r} is not {_NAMES[item]}")
            out.append(got)
        return tuple(out)
    got = _scalar(hint, value)
    if got is _BAD:
        raise ValueError(f"{where} must be {_NAMES[hint]}, got {value!r}")
    return got


def parse_logit_bias(value: str | dict) -> list[tuple[int, float]]:
    """'50256:-100,13:2.5' (or a mapping id -> bias) -> [(50256, -100.0), (13, 2.5)]."""
    items = value.items() if isinstance(value, dict) else (
        part.split(":", 1) if ":" in part else (part, None) for part in split_list(value))
    out = []
    for token, bias in items:
        try:
            out.append((int(str(token).strip()), float(str(bias).strip())))
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: {token}:{bias} is not ID:BIAS (an integer token id "
                             "and a number, e.g. 50256:-100)") from None
    return out


def _number(kind: type, text: str) -> Any:
    """`text` as an int or float list item when it spells one, else unchanged."""
    if kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            return text
    return text


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_BAD = object()


def _scalar(kind: type, value: Any) -> Any:
    """`value` as `kind`, or _BAD: YAML's true is no integer, and 1 is no string."""
    if kind not in _NAMES:
        raise TypeError(f"no coercion for options of type {kind}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not bool and isinstance(value, bool):
        return _BAD
    return value if isinstance(value, kind) else _BAD


def split_list(value: str) -> list[str]:
    """'16, 32' -> ['16', '32'] (blank items dropped)."""
    return [p.strip() for p in value.split(",") if p.strip()]


# --- presets ---------------------------------------------------------------------------------

def preset_dirs() -> list[Path]:
    """Where `--config NAME` looks: the presets installed with the package (package data,
    `pipeline/configs/`), then a source checkout's top-level `configs/`."""
    here = Path(__file__).resolve().parent
    return [here / "configs", here.parent / "configs"]


def resolve_preset(path_or_name: str) -> Path:
    """`--config` value -> file: a path as given, else NAME.yaml from `preset_dirs()`."""
    path = Path(path_or_name).expanduser()
    if path.exists() or path.suffix or "/" in path_or_name:
        return path
    for directory in preset_dirs():
        candidate = directory / f"{path_or_name}.yaml"
        if candidate.exists():
            return candidate
    return path


def load_preset(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML preset: (job option values, Beam pipeline arguments).

    Keys are option names (dashes allowed; sampling settings flat, like on the command line);
    the key `beam` holds a mapping of Beam options (`runner: DataflowRunner`) or a list of
    `--flag=value` strings. Values are returned as written; `coerce` checks them.
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


def build_config(mode: str, explicit: dict[str, Any], preset: dict[str, Any]) -> JobConfig:
    """The JobConfig of a run: defaults < preset values (coerced by type) < explicit values.

    `explicit` holds only the options the user typed (name -> parsed value); `preset` holds a
    YAML preset's job options as `load_preset` returns them. Raises ValueError (one line).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    values: dict[str, Any] = {}
    for name, value in preset.items():
        if name == "mode":
            if value != mode:
                raise ValueError(f"the --config preset is for mode {value!r}, not {mode!r}")
            continue
        values[name] = coerce(name, value)
    for name, value in explicit.items():
        if name not in FIELD_NAMES:
            raise ValueError(f"unknown job option {name!r}")
        values[name] = value
    for required in ("input", "output"):
        if not values.get(required):
            raise ValueError(f"--{required} is required (give it on the command line or as "
                             f"`{required}:` in the --config preset)")
    return JobConfig(mode=mode, **values)
