"""The command-line options of each job mode: flag, help and click type, one table per group.

The click default of every option comes from JobConfig (`pipeline.config.defaults`), so the
help, the presets and Python callers agree on one value. A new option is a JobConfig (or
SamplingConfig) field plus one entry here.
"""

from __future__ import annotations

from typing import Any

import click

from pipeline import formats
from pipeline.config import DTYPES, OUTPUT_FORMATS, split_list

PROG = "gpt2-pipeline"


class CommaList(click.ParamType):
    """`a,b,c` -> a tuple; the same syntax a preset may use for list options."""

    def __init__(self, item: type = str) -> None:
        self.item = item
        self.name = f"{item.__name__},..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        items = split_list(value)
        if self.item in (int, float):
            out = []
            for v in items:
                try:
                    out.append(self.item(v))
                except ValueError:
                    what = "an integer" if self.item is int else "a number"
                    self.fail(f"{v!r} is not {what}", param, ctx)
            return tuple(out)
        return tuple(items)


class CacheDir(click.ParamType):
    """A directory, or `off` (None)."""

    name = "DIR|off"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str | None:
        return None if value is None or str(value).lower() in ("off", "none", "") else value


class LogitBias(click.ParamType):
    """`ID:BIAS,...` -> ((id, bias), ...), as a preset may also write it."""

    name = "ID:BIAS,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> tuple[tuple[int, float], ...]:
        if isinstance(value, tuple):
            return value
        from pipeline.config import parse_logit_bias

        try:
            return tuple(parse_logit_bias(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


# --- options ---------------------------------------------------------------------------------
# (flags, help, extra click kwargs); the click default always comes from JobConfig so the help,
# the presets and Python callers agree on one value.
_Opt = tuple[str, str, dict[str, Any]]

COMMON: dict[str, _Opt] = {
    "input": ("--input", "Input file pattern: local path or any Beam filesystem (gs://...), "
              "e.g. 'data/*.parquet'. Required, here or as `input:` in --config.",
              dict(show_default=False)),
    "output": ("--output", "Output directory for the sharded result files; records that fail "
               "go to <output>-errors. Required, here or as `output:` in --config.",
               dict(show_default=False)),
    "model": ("--model", "Hugging Face Hub repo id or local checkpoint directory "
              f"(`{PROG} make-checkpoint` writes one offline).", {}),
    "revision": ("--revision", "Hub models: the branch, tag or commit to load. The job pins "
                 "it to the commit it resolves to (every worker loads those files) and records "
                 "that commit and the files' sha256 in _SUCCESS.",
                 dict(show_default="the main branch")),
    "input_format": ("--input-format", "Input format; by default chosen from the file "
                     "extension (" + ", ".join(s for f in formats.FORMATS.values()
                                               for s in f.suffixes) + ").",
                     dict(type=click.Choice(formats.names()),
                          show_default="from the file extension")),
    "output_format": ("--output-format", "Output file format.",
                      dict(type=click.Choice(OUTPUT_FORMATS))),
    "overwrite": ("--overwrite/--no-overwrite", "Replace a non-empty output location instead "
                  "of refusing to start.", {}),
    "compilation_cache": ("--compilation-cache", "Directory where compiled XLA programs are "
                          "kept between runs (JAX's persistent compilation cache), so a second "
                          "run of the same job compiles nothing; 'off' turns it off.",
                          dict(type=CacheDir())),
    "resume": ("--resume/--no-resume", "Finish an interrupted run: keep every input file or "
               "Parquet row group it completed and process only the rest. Refused when the "
               "settings differ from the interrupted run's (recorded in <output>/_resume/).",
               {}),
    "id_field": ("--id-field", "Input field holding the record id; by default a stable id "
                 "from the file name and line/row number, so reruns give the same ids.",
                 dict(show_default="<file>:<line or row>")),
    "keep_fields": ("--keep-fields", "Comma-separated input fields copied to every output row.",
                    dict(type=CommaList(str), show_default="none")),
    "dtype": ("--dtype", "Compute dtype of the matmuls (bfloat16 for GPU/TPU); scores and "
              "log-softmax are always float32.",
              dict(type=click.Choice(DTYPES))),
    "max_tokens_per_batch": ("--max-tokens-per-batch", "Token budget of one batch: rows per "
                             "batch = budget // padded length, so short texts travel in big "
                             "batches.",
                             dict(type=click.IntRange(min=1),
                                  show_default="2048 scoring on CPU (faster per token there), "
                                               "else 8192")),
    "tail_steps": ("--tail-steps", "A part-filled batch (the last of a bundle) is padded to "
                   "the next 1/N of the full row count instead of all of it: less padding for "
                   "at most N compiled shapes per length; 1 = always full batches.",
                   dict(type=click.IntRange(min=1))),
    "bucket_boundaries": ("--bucket-boundaries", "Comma-separated padded lengths, e.g. "
                          "16,32,64; each is one compiled shape per worker.",
                          dict(type=CommaList(int),
                               show_default="powers of two from 16 up to the context")),
}
SCORE: dict[str, _Opt] = {
    "text_field": ("--text-field", "Input field holding the text to score (with "
                   "--context-field: the continuation).", {}),
    "context_field": ("--context-field", "Condition on this field and score only --text-field "
                      "as its continuation (adds is_greedy).",
                      dict(show_default="none: score the whole text")),
    "pack": ("--pack/--no-pack", "Pack several texts into each row of the model's context "
             "(they never attend to each other): one compiled shape and little padding. "
             "--no-pack gives each text its own row, bucketed by --bucket-boundaries.", {}),
    "add_bos": ("--add-bos/--no-add-bos", "Prepend <|endoftext|> so the first token of each "
                "text is scored too.", {}),
    "stride": ("--stride", "Rolling-window stride for texts longer than the context.",
               dict(type=click.IntRange(min=1), show_default="the window length")),
    "allow_empty": ("--allow-empty/--no-allow-empty", "Give an empty text a row with 0 tokens "
                    "instead of sending it to the errors output.", {}),
    "choices_field": ("--choices-field", "Multiple choice: input field holding a list of "
                      "strings, each scored as a continuation of --context-field (which is "
                      "required); one row per record with every choice's log-likelihood, pred "
                      "and pred_norm, as lm-evaluation-harness's acc and acc_norm.",
                      dict(show_default="none")),
    "label_field": ("--label-field", "With --choices-field: input field holding the index of "
                    "the right choice; adds correct/correct_norm and the job's accuracy.",
                    dict(show_default="none")),
    "target_delimiter": ("--target-delimiter", "With --choices-field: text put before each "
                         "choice when it is scored but not counted in its length for "
                         "pred_norm, as lm-evaluation-harness's target_delimiter (its tasks "
                         "use \" \" with choices written without the space).",
                         dict(show_default="empty")),
    "top_logprobs": ("--top-logprobs", "Add the K most likely tokens and their log-probs at "
                     "every scored position (top_token_ids, top_logprobs; best first).",
                     dict(type=click.IntRange(1, 20), show_default="off")),
    "entropy": ("--entropy/--no-entropy", "Add the entropy (nats) of the model's next-token "
                "distribution at every scored position.", {}),
    "summary_only": ("--summary-only/--no-summary-only", "Write document-level numbers only: "
                     "drop the per-token list columns (token ids, log-probs, greedy flags, "
                     "top-K, entropy).", {}),
}
GENERATE: dict[str, _Opt] = {
    "prompt_field": ("--prompt-field", "Input field holding the prompt.", {}),
    "max_new_tokens": ("--max-new-tokens", "Tokens generated per sample at most.",
                       dict(type=click.IntRange(min=1))),
    "temperature": ("--temperature", "Sampling temperature; 0 is greedy decoding.",
                    dict(type=click.FloatRange(min=0))),
    "top_k": ("--top-k", "Sample among the k most likely tokens; 0 turns it off.",
              dict(type=click.IntRange(min=0))),
    "top_p": ("--top-p", "Nucleus sampling: the smallest set of tokens with this much "
              "probability; 1.0 turns it off.",
              dict(type=click.FloatRange(min=0, max=1, min_open=True))),
    "seed": ("--seed", "Random seed; with the record id it fixes each record's samples, so "
             "reruns are identical.", {}),
    "num_samples": ("--num-samples", "Samples (output rows) per prompt.",
                    dict(type=click.IntRange(min=1))),
    "stop": ("--stop", "Stop string; the text is cut before it. Repeat for several.",
             dict(multiple=True, show_default="none")),
    "stop_token_ids": ("--stop-token-ids", "Comma-separated token ids that end a sample like "
                       "<|endoftext|> (not part of the output; finish_reason stop_token).",
                       dict(type=CommaList(int), show_default="none")),
    "min_p": ("--min-p", "Sample among tokens at least this fraction of the most likely "
              "one's probability (transformers' min_p); 0 turns it off.",
              dict(type=click.FloatRange(min=0, max=1))),
    "repetition_penalty": ("--repetition-penalty", "Above 1 discourages every token of the "
                           "prompt and output so far (transformers' repetition_penalty, "
                           "applied in greedy decoding too); 1 turns it off.",
                           dict(type=click.FloatRange(min=0, min_open=True))),
    "presence_penalty": ("--presence-penalty", "Subtracted once from the logit of every token "
                         "already generated (vLLM/OpenAI); 0 turns it off.",
                         dict(type=click.FloatRange(min=-2, max=2))),
    "frequency_penalty": ("--frequency-penalty", "Subtracted from a token's logit per time it "
                          "was generated (vLLM/OpenAI); 0 turns it off.",
                          dict(type=click.FloatRange(min=-2, max=2))),
    "no_repeat_ngram_size": ("--no-repeat-ngram-size", "No n-gram of this size occurs twice "
                             "in prompt + output (transformers); 0 turns it off.",
                             dict(type=click.IntRange(min=0))),
    "min_new_tokens": ("--min-new-tokens", "<|endoftext|> and --stop-token-ids are held back "
                       "until this many tokens are generated.",
                       dict(type=click.IntRange(min=0))),
    "bad_words": ("--bad-words", "Comma-separated words never generated; each is banned as "
                  "written and with a leading space (GPT-2 spells a word after a space "
                  "differently), as transformers' bad_words_ids.",
                  dict(type=CommaList(str), show_default="none")),
    "logit_bias": ("--logit-bias", "ID:BIAS,... added to those tokens' logits "
                   "(e.g. 50256:-100 all but bans <|endoftext|>).",
                   dict(type=LogitBias(), show_default="none")),
    "top_logprobs": ("--top-logprobs", "Add the K (1-20) most likely tokens and their "
                     "log-probs at every generated position (top_token_ids, top_logprobs).",
                     dict(type=click.IntRange(1, 20), show_default="off")),
    "echo": ("--echo/--no-echo", "Add each prompt token's log-prob given the tokens before it "
             "(prompt_token_logprobs; the first is null).", {}),
    "num_beams": ("--num-beams", "Beam search with this many beams (deterministic; with "
                  "temperature 0); 1 = no beam search.", dict(type=click.IntRange(min=1))),
    "length_penalty": ("--length-penalty", "Beam search: a hypothesis scores sum logprob / "
                       "length ** this (transformers).", {}),
    "early_stopping": ("--early-stopping/--no-early-stopping", "Beam search: stop a prompt as "
                       "soon as num_beams hypotheses are finished (transformers' True/False).",
                       {}),
    "num_return_sequences": ("--num-return-sequences", "Beam search: rows per prompt, best "
                             "first (sequence_score); at most --num-beams.",
                             dict(type=click.IntRange(min=1))),
}
FILTER: dict[str, _Opt] = {
    "by": ("--by", "The score the rule cuts on.",
           dict(type=click.Choice(["perplexity", "bits_per_byte", "mean_logprob"]))),
    "max_value": ("--max-value", "Keep records whose --by value is at most this "
                  "(<output>/kept/), the rest go to <output>/dropped/.",
                  dict(type=float, show_default="none")),
    "min_value": ("--min-value", "Keep records whose --by value is at least this.",
                  dict(type=float, show_default="none")),
    "quantiles": ("--quantiles", "Comma-separated fractions, e.g. 0.3,0.7: cut points at "
                  "these quantiles of this corpus' --by values; one bucket per range, lowest "
                  "values first.", dict(type=CommaList(float), show_default="none")),
    "bucket_names": ("--bucket-names", "Names of the quantile buckets (one more than "
                     "--quantiles), e.g. head,middle,tail.",
                     dict(type=CommaList(str), show_default="q0,q1,..")),
    "group_field": ("--group-field", "Cut points per value of this field (as CCNet does per "
                    "language).", dict(show_default="none")),
    "thresholds_from": ("--thresholds-from", "Apply the rule and cut points recorded by an "
                        "earlier filter job (its output directory) to this corpus.",
                        dict(show_default="none")),
    "score_prefix": ("--score-prefix", "Prefix of the score columns appended to every record "
                     "(perplexity, bits_per_byte, mean_logprob, num_tokens).", {}),
}
TAIL: dict[str, _Opt] = {
    "progress": ("--progress/--no-progress", "Print a live progress line and a final summary "
                 "on stderr.", {}),
    "report": ("--report/--no-report", "At the end of the job, write <output>/report.html "
               "(what `gpt2-pipeline report` writes).", {}),
}
# A filter writes the records back in their own format, whole: no output format, no kept
# fields, and of the score options those that change how a document is scored.
_FILTER_COMMON = {k: v for k, v in COMMON.items() if k not in ("output_format", "keep_fields")}
_FILTER_SCORE = {k: SCORE[k] for k in ("text_field", "pack", "add_bos", "stride")}
MODE_OPTIONS: dict[str, dict[str, _Opt]] = {
    "score": {**COMMON, **SCORE, **TAIL},
    "generate": {**COMMON, **GENERATE, **TAIL},
    "filter": {**_FILTER_COMMON, **_FILTER_SCORE, **FILTER, **TAIL},
}


