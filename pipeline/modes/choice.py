"""Multiple choice (score with --choices-field): every choice a continuation of one context.

Each choice is tokenized as lm-evaluation-harness tokenizes a (context, choice) pair, and the
choices that fit the window together share one `TokenTree` (the context computed once). The
model step returns `PartScores` whose tokens are the choices' tokens in order; `row` splits them
back per choice and predicts as lm-eval's `acc` (argmax of log-likelihood) and `acc_norm`
(argmax of log-likelihood per character of the choice).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

from gpt2model.scoring import choice_parts, lm_eval_pair
from pipeline import metrics
from pipeline.modes.score import PartScores, ScoreItem
from pipeline.records import Record, RecordInfo, with_kept_fields

FIELDS = [
    pa.field("id", pa.string()),
    pa.field("choice_logprobs", pa.list_(pa.float64())),
    pa.field("choice_num_tokens", pa.list_(pa.int32())),
    pa.field("choice_is_greedy", pa.list_(pa.bool_())),
    pa.field("pred", pa.int32()),
    pa.field("pred_norm", pa.int32()),
]
LABEL_FIELDS = [pa.field("correct", pa.bool_()), pa.field("correct_norm", pa.bool_())]


def schema(config: Any, keep_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The Arrow schema of a multiple-choice job's output (documented in the README)."""
    fields = FIELDS + (LABEL_FIELDS if config.label_field else [])
    return with_kept_fields(fields, config.keep_fields, keep_types)


@dataclasses.dataclass(frozen=True)
class ChoiceMeta(RecordInfo):
    """What the row needs: each choice's token count and length in characters, the label."""

    num_tokens: tuple[int, ...] = ()
    num_chars: tuple[int, ...] = ()
    label: int | None = None


def make_items(rec: Record, config: Any, tokenizer: Any, context: int):
    """A multiple-choice record -> ScoreItems covering its choices in order."""
    eos = tokenizer.eos_token_id
    pairs = [lm_eval_pair(tokenizer.encode, rec.text, config.target_delimiter + choice, eos)
             for choice in rec.choices]
    ctx_ids = pairs[0][0]  # the same for every choice: it depends on the context alone
    conts = [cont for _, cont, _ in pairs]
    empty = next((i for i, c in enumerate(conts) if not c), None)
    if empty is not None:
        raise ValueError(f"choice {empty} has no tokens of its own: it merges into the "
                         "context's last token when the two are tokenized together")
    meta = ChoiceMeta.of(rec, num_tokens=tuple(len(c) for c in conts),
                         num_chars=tuple(len(c) for c in rec.choices), label=rec.label)
    parts = choice_parts(ctx_ids, conts, window=context, eos_token_id=eos)
    for i, part in enumerate(parts):
        yield ScoreItem(rec.key, i, len(parts), part, meta if i == 0 else None)


_labelled = metrics.counter(metrics.LABELLED)
_correct = metrics.counter(metrics.CORRECT)
_correct_norm = metrics.counter(metrics.CORRECT_NORM)


def row(result: PartScores, config: Any) -> dict[str, Any]:
    """One row per record: each choice's log-likelihood, token count and greedy flag, the
    predictions and, with a label, whether they are right (counted for the job's accuracy)."""
    meta: ChoiceMeta = result.meta
    ends = np.cumsum(meta.num_tokens)
    lps = [float(np.sum(lp, dtype=np.float64)) for lp in np.split(result.logprobs, ends[:-1])]
    greedy = [bool(np.all(g)) for g in np.split(result.greedy, ends[:-1])]
    # np.argmax takes the first of equal maxima, as lm-eval does.
    pred = int(np.argmax(lps))
    pred_norm = int(np.argmax(np.array(lps) / np.array(meta.num_chars, np.float64)))
    out = {"id": meta.id, "choice_logprobs": lps, "choice_num_tokens": list(meta.num_tokens),
           "choice_is_greedy": greedy, "pred": pred, "pred_norm": pred_norm}
    if config.label_field:
        out["correct"] = pred == meta.label
        out["correct_norm"] = pred_norm == meta.label
        _labelled.inc()
        _correct.inc(int(out["correct"]))
        _correct_norm.inc(int(out["correct_norm"]))
    out.update(meta.keep)
    return out


def tokens(row: dict[str, Any], config: Any) -> int:
    """The tokens a row scored: every choice's continuation."""
    return sum(row["choice_num_tokens"] or ())
