"""GPT2Config: model hyperparameters, field names = the keys of Hugging Face `config.json`;
SamplingConfig: how continuations are chosen (a separate object: run settings, not the model).

Loading a checkpoint's config is `GPT2Config.from_dict(json)`: no name translation, so any
GPT-2-architecture checkpoint (distilgpt2, fine-tunes) loads through its own config.json.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any

from gpt2model.errors import CheckpointError

# Activations GPT-2 checkpoints use, by their Hugging Face names (see gpt2model.model.ACTIVATIONS).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "quick_gelu", "silu")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model; immutable and hashable so it can be a static jit arg."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    model_type: str = "gpt2"
    # Dropout rates are kept so a config round-trips; inference never applies dropout.
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1

    def __post_init__(self) -> None:
        if self.model_type != "gpt2":
            raise CheckpointError(
                f"config.json has model_type {self.model_type!r}; only 'gpt2' checkpoints are "
                "supported"
            )
        if self.n_embd % self.n_head:
            raise CheckpointError(
                f"config.json: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(
                f"config.json: activation_function {self.activation_function!r} is not one of "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive integer")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Build from a config.json dict; unknown keys (summary_*, architectures, ...) are ignored.

        A missing `model_type` is taken as gpt2 only when the dict looks like a GPT-2 config
        (has n_embd); anything else is refused rather than guessed.
        """
        d = dict(d)
        if "model_type" not in d and "n_embd" not in d:
            raise CheckpointError("config.json has no model_type and is not a GPT-2 config")
        if "n_ctx" in d and "n_positions" not in d:  # very old configs
            d["n_positions"] = d["n_ctx"]
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as err:
            raise CheckpointError(f"config.json is not a valid GPT-2 config: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (what Hugging Face tools read)."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["GPT2LMHeadModel"]
        d["n_ctx"] = self.n_positions
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> GPT2Config:
        """Read config.json of a Hub repo id or a local checkpoint directory."""
        from gpt2model.hub import resolve_file

        path = resolve_file(name_or_path, "config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named size (see PRESETS), for building models without downloading anything.

        `overrides` change single fields of the preset (tests use `tiny` with a short context).
        """
        try:
            fields = PRESETS[name.removeprefix("openai-community/")]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
        return cls(**{**fields, **overrides})

    def replace(self, **changes: Any) -> GPT2Config:
        return dataclasses.replace(self, **changes)


# The published OpenAI sizes, and `tiny`: small enough to run anywhere in seconds, with the real
# vocabulary and context so it goes through the same code paths (CLI make-checkpoint, bench
# smoke runs, tests). The one definition of each size; everything else refers to these names.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": dict(n_embd=768, n_layer=6, n_head=12),
}


MAX_TOP_LOGPROBS = 20  # as vLLM and OpenAI's API allow


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How continuations are chosen: static and hashable, so it can key the jitted program.

    Keyword-only: a field added later can never shift the others. temperature 0 means greedy
    decoding; top_k 0, top_p 1.0 and min_p 0 disable those filters (they apply when sampling
    only). The logits controls (penalties, n-grams, bad words, bias, min_new_tokens) apply in
    greedy decoding too, as transformers' processors do; `gpt2model.processors` holds them and
    their order. Reported log-probs stay the model's own. A job config holds one of these
    (`pipeline.config.JobConfig.sampling`), so a new control is one field here plus its use.
    Token-id sequences given as lists are stored as tuples of ints.
    """

    max_new_tokens: int = 32  # tokens generated per sample at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    min_p: float = 0.0  # sample among tokens with p >= min_p * p_max (transformers); 0 = off
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one produced
    # A row ends when it generates one of these, as at eos: the token is not part of the output
    # and the finish reason is "stop_token".
    stop_token_ids: tuple[int, ...] = ()
    # > 1 discourages every token of prompt + output so far, < 1 favours it (transformers,
    # CTRL's penalty: negative logits multiplied, positive ones divided); 1.0 = off.
    repetition_penalty: float = 1.0
    # Subtracted from the logit of each token generated so far once (presence) and per
    # occurrence (frequency), as vLLM and OpenAI define them: the prompt does not count; 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0  # no n-gram of prompt + output occurs twice; 0 = off
    min_new_tokens: int = 0  # eos and stop_token_ids suppressed before this many tokens; 0 = off
    # Token sequences never generated: a one-token word always banned, a longer one's last
    # token banned where the context ends with its other tokens (transformers' bad_words_ids).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits
    # Report at each generated position the K most likely tokens and their log-probs, from the
    # model's raw distribution (the one `logprobs` come from; vLLM's default); 0 = off, 1..20.
    top_logprobs: int = 0
    # Also report each prompt token's log-prob given the tokens before it (the first: None).
    echo: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if isinstance(self.stop, str) or not all(isinstance(x, str) for x in self.stop):
            raise ValueError("stop must be a tuple of strings")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got "
                             f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got "
                                 f"{getattr(self, name)!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids,
                                                              "stop_token_ids"))
        if not isinstance(self.bad_words_ids, tuple | list) or not all(
                isinstance(w, tuple | list) for w in self.bad_words_ids):
            raise ValueError("bad_words_ids must be a tuple of token-id tuples, e.g. "
                             f"((3, 7), (9,)), got {self.bad_words_ids!r}")
        words = tuple(_token_ids(w, "each bad word") for w in self.bad_words_ids)
        if any(not w for w in words):
            raise ValueError("bad_words_ids: a bad word is empty (it needs at least one token id)")
        object.__setattr__(self, "bad_words_ids", words)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in 1..{MAX_TOP_LOGPROBS} "
                             f"(0 = off), got {self.top_logprobs!r}")
        if not isinstance(self.echo, bool):
            raise ValueError(f"echo must be true or false, got {self.echo!r}")

    @property
    def program(self) -> SamplingConfig:
        """The settings the jitted programs depend on (stop strings are cut on the host): the
        decode loop reads all but `echo`, the prefill `max_new_tokens` and `echo`."""
        return dataclasses.replace(self, stop=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _token_ids(ids: Any, what: str) -> tuple[int, ...]:
    """ids as a tuple of non-negative ints, or a ValueError naming `what`."""
    if isinstance(ids, str | bytes) or not isinstance(ids, tuple | list) or not all(
            _is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"{what} must be a tuple of non-negative integer token ids, got {ids!r}")
    return tuple(int(t) for t in ids)


def _bias_pairs(pairs: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as ((token id, float bias), ...) with distinct ids, or a ValueError."""
    shape = "logit_bias must be (token id, bias) pairs, e.g. ((50256, -5.0),)"
    if isinstance(pairs, str) or not isinstance(pairs, tuple | list):
        raise ValueError(f"{shape}, got {pairs!r}")
    out = []
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"{shape}, got {pair!r}")
        token, bias = pair
        if not _is_int(token) or token < 0:
            raise ValueError(f"logit_bias: token id {token!r} is not a non-negative integer")
        if not isinstance(bias, int | float) or isinstance(bias, bool) or bias != bias:
            raise ValueError(f"logit_bias: the bias of token {token} must be a number, got "
                             f"{bias!r}")
        out.append((int(token), float(bias)))
    if len({t for t, _ in out}) != len(out):
        raise ValueError("logit_bias: a token id appears twice")
    return tuple(out)
