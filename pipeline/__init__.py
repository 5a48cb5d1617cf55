"""The Beam side: jobs (`pipeline.jobs`), the CLI (`pipeline.cli`), and the ModelHandlers a
user's own pipeline embeds with RunInference (loaded on first use: `import pipeline` stays
cheap)."""

from __future__ import annotations

from typing import Any

__all__ = ["GPT2GenerationModelHandler", "GPT2ScoringModelHandler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
