"""Job modes: one module each, holding its work items, its output schema and its row builder.

A module here provides `make_items(record, config, tokenizer, context)` (a record -> its work
items, or tagged error rows), `schema(config, keep_types)` and the
row builder its job calls on the model step's typed results. Adding a mode is a module here,
its name in MODES, its PTransform in `pipeline.jobs` and its command in `pipeline.cli`.
Modules are imported on use: the CLI reads MODES without importing Beam.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODES = ("score", "generate", "filter")


def get(name: str) -> ModuleType:
    """The module of mode `name`."""
    if name not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {name!r}")
    return importlib.import_module(f"pipeline.modes.{name}")


def for_config(config) -> ModuleType:
    """The module whose items, schema and rows a job of `config` uses: multiple choice is a
    score job with a choices field."""
    if config.mode == "score" and getattr(config, "choices_field", None):
        return importlib.import_module("pipeline.modes.choice")
    return get(config.mode)
