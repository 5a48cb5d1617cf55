"""pipeline.config: JobConfig holding a SamplingConfig, and preset values coerced by field type."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gpt2model import SamplingConfig
from pipeline.config import FIELD_NAMES, JobConfig, coerce, defaults


def test_sampling_settings_live_in_one_sampling_config():
    config = JobConfig(mode="generate", temperature=0.7, top_k=40, stop=("\n",), seed=3)
    assert config.sampling == SamplingConfig(temperature=0.7, top_k=40, stop=("\n",))
    assert (config.temperature, config.top_k, config.stop, config.seed) == (0.7, 40, ("\n",), 3)
    changed = config.replace(top_p=0.9)
    assert changed.sampling == dataclasses.replace(config.sampling, top_p=0.9)
    assert config.sampling.top_p == 1.0  # frozen: the original is untouched
    given = JobConfig(sampling=SamplingConfig(max_new_tokens=5), temperature=1.0)
    assert given.sampling == SamplingConfig(max_new_tokens=5, temperature=1.0)
    # No JobConfig field re-declares a sampling setting, but top_logprobs: one option of the
    # score and generate commands, copied into a generate job's sampling.
    sampling_names = {f.name for f in dataclasses.fields(SamplingConfig)}
    assert sampling_names & {f.name for f in dataclasses.fields(JobConfig)} <= {"top_logprobs"}
    if "top_logprobs" in sampling_names:
        assert JobConfig(mode="generate", top_logprobs=3).sampling.top_logprobs == 3
        assert JobConfig(mode="score", top_logprobs=3).sampling.top_logprobs == 0


def test_a_config_round_trips_through_json():
    config = JobConfig(mode="generate", temperature=0.5, stop=("a", "b"), keep_fields=("k",))
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    back = JobConfig(**data)  # lists (JSON arrays) become the tuples they were
    assert back == config and hash(back.sampling) == hash(config.sampling)


def test_bad_construction_is_refused():
    with pytest.raises(TypeError):
        SamplingConfig(32, 0.5)  # keyword-only: a new field can never shift the others
    with pytest.raises(TypeError, match="unknown option"):
        JobConfig(temprature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        JobConfig(top_p=0.0)
    with pytest.raises(AttributeError):
        _ = JobConfig().no_such_setting


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_option_coerces_its_own_default(name):
    """Coercion is driven by each field's type: a field of a type it cannot handle fails here."""
    assert coerce(name, defaults()[name]) == defaults()[name]


@pytest.mark.parametrize("name, value, expected", [
    ("keep_fields", "a, b", ("a", "b")),
    ("keep_fields", ["a"], ("a",)),
    ("bucket_boundaries", "16,32", (16, 32)),
    ("bucket_boundaries", None, None),
    ("stop", "a,b", ("a,b",)),  # one stop string, commas and all
    ("stop", ["x", "y"], ("x", "y")),
    ("temperature", 1, 1.0),
    ("stride", None, None),
    ("id_field", None, None),
])
def test_coercion_by_type(name, value, expected):
    assert coerce(name, value) == expected


@pytest.mark.parametrize("name, value, message", [
    ("max_new_tokens", 1.5, "must be an integer"),
    ("top_k", True, "must be an integer"),
    ("pack", 1, "must be true or false"),
    ("text_field", 3, "must be a string"),
    ("text_field", None, "must be a string"),
    ("stop", 3, "must be a list"),
    ("bucket_boundaries", [1, "x"], "'x' is not an integer"),
    ("no_such_option", 1, "unknown job option"),
])
def test_coercion_errors_name_the_option(name, value, message):
    with pytest.raises(ValueError, match=message) as err:
        coerce(name, value)
    assert name in str(err.value)


def test_the_batch_budget_defaults_by_backend_and_mode():
    """No --max-tokens-per-batch: scoring on CPU runs 2048-token steps (faster per token there),
    generation and other backends 8192; a budget given is kept as given."""
    import jax

    from pipeline.config import CPU_SCORE_BATCH_TOKENS, DEFAULT_BATCH_TOKENS

    assert jax.default_backend() == "cpu"  # the tests run on CPU
    assert JobConfig(mode="score").batch_token_budget() == CPU_SCORE_BATCH_TOKENS == 2048
    assert JobConfig(mode="filter", max_value=5.0).batch_token_budget() == CPU_SCORE_BATCH_TOKENS
    assert JobConfig(mode="generate").batch_token_budget() == DEFAULT_BATCH_TOKENS == 8192
    assert JobConfig(mode="score", max_tokens_per_batch=512).batch_token_budget() == 512
    assert JobConfig(mode="generate", max_tokens_per_batch=512).batch_token_budget() == 512
    with pytest.raises(ValueError, match="max_tokens_per_batch must be >= 1"):
        JobConfig(mode="score", max_tokens_per_batch=0)
