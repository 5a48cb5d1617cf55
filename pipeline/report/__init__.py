"""`gpt2-pipeline report`: one self-contained HTML page showing what a finished job found.

It reads a finished output of any mode (its `_SUCCESS` says which and with what settings),
streams the needed columns of its shards (see `data`), and writes one HTML file with inline SVG
plots and no scripts, fonts or anything else from the network. No Beam is needed.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.formats import InputError
from pipeline.output import SUCCESS_MARKER, errors_path
from pipeline.report import data
from pipeline.report.data import edges as _edges
from pipeline.report.data import length_histogram as _length_hist
from pipeline.report.render import (
    CSS,
    bar_svg,
    esc,
    figure,
    histogram_svg,
    legend,
    plain,
    safe_id,
    table,
    token_spans,
)
from pipeline.report.render import (
    fmt as _fmt,
)

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
BINS = 40
MAX_GROUPS = 12  # groups drawn one by one; the table lists them all


def build_report(output: str | Path, out_file: str | Path | None = None, examples: int = 5,
                 group_field: str | None = None) -> Path:
    """Write the report of the finished job output `output` (default `<output>/report.html`).

    Raises InputError (one line) for a directory that holds no finished job.
    """
    root = Path(output)
    marker = root / SUCCESS_MARKER
    if not marker.is_file():
        raise InputError(f"{str(root)!r} is not a finished job output (no {SUCCESS_MARKER}); "
                         "run the job to the end first")
    try:
        summary = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{marker}: not a job summary ({type(err).__name__})") from None
    job = summary.get("job") or {}
    report = _Report(root, summary, job, examples, group_field or job.get("group_field"))
    page = report.page()
    target = Path(out_file) if out_file else root / "report.html"
    target.write_text(page, encoding="utf-8")
    return target


class _Report:
    def __init__(self, root: Path, summary: dict, job: dict, n: int, group: str | None):
        self.root, self.summary, self.job, self.n, self.group = root, summary, job, n, group
        self.tokenizer = self._tokenizer()

    def _tokenizer(self):
        try:
            from gpt2model import get_tokenizer

            return get_tokenizer(self.job["model"]) if self.job.get("model") else None
        except Exception:  # offline and not cached, moved: token ids are shown instead
            return None

    def mode(self) -> str:
        if self.summary.get("filter") is not None or self.job.get("mode") == "filter":
            return "filter"
        if self.job.get("choices_field"):
            return "choice"
        return self.job.get("mode") or "score"

    def page(self) -> str:
        mode = self.mode()
        body = [f"<h1>gpt2-pipeline report: {esc(mode)}</h1>",
                f"<p>Output <code>{esc(self.root)}</code></p>", self._summary()]
        body += {"score": self._score, "choice": self._choice, "filter": self._filter,
                 "generate": self._generate}[mode]()
        body.append(self._errors())
        return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"<title>gpt2-pipeline report: {esc(self.root.name)}</title>"
                f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")

    # --- every mode ----------------------------------------------------------------------

    def _summary(self) -> str:
        s = self.summary
        keys = [("records in", "input_records"), ("records done", "result_records"),
                ("output rows", "output_rows"), ("errors", "error_records"),
                ("tokens", "tokens"), ("seconds", "seconds"), ("batches", "batches"),
                ("compilations", "compiles"), ("model-step seconds", "model_seconds")]
        rows = [[label, s[k]] for label, k in keys if s.get(k) is not None]
        attrs = [{"key": k} for label, k in keys if s.get(k) is not None]
        if s.get("seconds"):
            rows.append(["tokens/s", s.get("tokens", 0) / s["seconds"]])
            attrs.append({"key": "tokens_per_second"})
        for k in ("model", "dtype"):
            if self.job.get(k):
                rows.append([k, self.job[k]])
                attrs.append({"key": k})
        defaults = _job_defaults()
        options = {k: v for k, v in self.job.items() if k not in ("model", "dtype", "mode")
                   and defaults.get(k, object()) != v}
        return ("<h2 id=\"summary\">Job</h2>" + table(["", ""], rows, "summary", attrs)
                + "<p>Options: <code>" + esc(json.dumps(options, ensure_ascii=False))
                + "</code></p>")

    def _errors(self) -> str:
        counts, samples = data.read_errors(errors_path(str(self.root)))
        if not counts:
            return "<h2 id=\"errors\">Errors</h2><p>No error rows.</p>"
        order = sorted(counts, key=lambda k: -counts[k])
        parts = ["<h2 id=\"errors\">Errors</h2>",
                 table(["reason", "records"], [[k, counts[k]] for k in order], "error-reasons",
                       [{"count": counts[k]} for k in order])]
        for kind in order[:20]:
            for e in samples[kind]:
                parts.append(f'<div class="doc error"><span class="meta">{esc(e.get("source"))}'
                             f' line {esc(e.get("line"))}, id {esc(e.get("id"))}: '
                             f'{esc(e.get("reason"))}</span>{plain(e.get("raw"))}</div>')
        return "".join(parts)

    # --- score -----------------------------------------------------------------------------

    def _value_section(self, paths: list[Path], column: str, label: str, log_x: bool,
                       cuts: list[tuple[str, float]] = (),
                       where: tuple[str, Any] | None = None) -> str:
        """Histogram of one column (rows where `where` = (field, value) hold)."""
        stats = data.ValueStats()
        cols = [column] + ([where[0]] if where else [])
        for path in paths:
            for batch in data.iter_batches(path, cols):
                for i, v in enumerate(batch[column]):
                    if not where or batch[where[0]][i] == where[1]:
                        stats.add(v)
        return self._value_plot(paths, column, label, log_x, stats, cuts=cuts, where=where)

    def _value_plot(self, paths: list[Path], column: str, label: str, log_x: bool,
                    stats: data.ValueStats, groups: dict[Any, data.ValueStats] | None = None,
                    cuts: list[tuple[str, float]] = (),
                    where: tuple[str, Any] | None = None) -> str:
        """The histogram of a column whose stats were collected (one more pass, for the bin
        counts), and with `groups` a table of its quantiles per value of the group field."""
        if not stats.count:
            return f"<p>No {esc(label)} values.</p>"
        edges = _edges(stats, log_x)
        counts = data.histogram(paths, column, edges, where)
        name = f"hist-{column}" + (f"-{safe_id(str(where[1]))}" if where else "")
        parts = [figure(histogram_svg(edges, counts, label, log_x, cuts), name)]
        if groups:
            named = sorted(groups, key=lambda g: -groups[g].count)
            qrows = [[str(g), groups[g].count, *groups[g].quantiles((0.1, 0.5, 0.9))]
                     for g in named]
            parts.append(table([self.group, "records", "p10", "median", "p90"], qrows,
                               f"groups-{column}", [{"group": r[0]} for r in qrows]))
        return "".join(parts)

    def _quantile_table(self, stats: dict[str, data.ValueStats]) -> str:
        columns = list(stats)
        qs = {c: stats[c].quantiles(QUANTILES) for c in columns}
        rows, attrs = [], []
        for i, q in enumerate(QUANTILES):
            rows.append([f"{q:g}", *[qs[c][i] if qs[c] else "-" for c in columns]])
            attrs.append({"q": q, **{c: qs[c][i] for c in columns if qs[c]}})
        note = ("exact" if all(s.exact for s in stats.values()) else
                f"from a uniform sample of {data.RESERVOIR:,} rows")
        return (table(["quantile", *columns], rows, "quantiles", attrs)
                + f"<p>Quantiles {note} (numpy's linear definition).</p>")

    def _score(self) -> list[str]:
        paths = data.shards(self.root)
        plotted = ("perplexity", "bits_per_byte")
        # One pass for every column's stats, the per-group stats and the example rows.
        stats = {c: data.ValueStats() for c in (*plotted, "num_tokens")}
        groups: dict[str, dict[Any, data.ValueStats]] = {c: {} for c in plotted}
        ext = data.Extremes(self.n)
        cols = list(stats) + ([self.group] if self.group else [])
        for s, path in enumerate(paths):
            row = 0
            for batch in data.iter_batches(path, cols):
                for i, ppl in enumerate(batch["perplexity"]):
                    for c, st in stats.items():
                        st.add(batch[c][i])
                    if self.group:
                        for c in plotted:
                            groups[c].setdefault(batch[self.group][i],
                                                 data.ValueStats()).add(batch[c][i])
                    ext.add(ppl, s, row)
                    row += 1
        parts = ["<h2 id=\"distribution\">Perplexity and bits per byte</h2>"]
        plots = [self._value_plot(paths, c, label, c == "perplexity", stats[c], groups[c])
                 for c, label in zip(plotted, ("perplexity (log scale)", "bits per byte"),
                                     strict=True)]
        parts.append(f"<div class=\"plots\">{''.join(plots)}</div>")
        parts.append(self._quantile_table(stats))
        parts.append(legend())
        for title, sid, picks in (("Lowest perplexity", "lowest", ext.lowest()),
                                  ("Highest perplexity", "highest", ext.highest()),
                                  ("Sampled", "sampled", [(None, s, r) for s, r in ext.sampled])):
            rows = self._fetch(paths, [(s, r) for _, s, r in picks])
            parts.append(f'<h2 id="{sid}">{title}</h2><div class="examples" id="ex-{sid}">')
            parts += [self._scored_doc(rows[(s, r)]) for _, s, r in picks]
            parts.append("</div>")
        return parts

    def _fetch(self, paths: list[Path], keys: list[tuple[int, int]]) -> dict:
        out = {}
        for s in {s for s, _ in keys}:
            got = data.fetch_rows(paths[s], {r for ss, r in keys if ss == s})
            out.update({(s, r): row for r, row in got.items()})
        return out

    def _pieces(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [f"[{t}]" for t in ids]
        return [self.tokenizer.decode([int(t)]) for t in ids]

    def _scored_doc(self, row: dict) -> str:
        ids = row.get("token_ids") or []
        lps = row.get("token_logprobs") or [None] * len(ids)
        tops = None
        if row.get("top_token_ids"):
            tops = [None if t is None else list(zip(self._pieces(t), lp, strict=True))
                    for t, lp in zip(row["top_token_ids"][:400], row["top_logprobs"][:400],
                                     strict=True)]
        meta = (f'<span class="meta">id {esc(row.get("id"))} · perplexity '
                f'{_fmt(row.get("perplexity"))} · {esc(row.get("num_tokens"))} tokens</span>')
        body = token_spans(self._pieces(ids), lps, tops) if ids else (
            '<span class="more">no per-token columns in this output (--summary-only)</span>')
        return f'<div class="doc" data-id="{esc(row.get("id"))}">{meta}{body}</div>'

    # --- multiple choice -------------------------------------------------------------------

    def _choice(self) -> list[str]:
        s = self.summary
        parts = ["<h2 id=\"accuracy\">Accuracy</h2>"]
        if s.get("labelled"):
            parts.append(table(["", "value"], [["labelled records", s["labelled"]],
                                               ["accuracy (acc)", s["accuracy"]],
                                               ["normalized accuracy (acc_norm)",
                                                s["accuracy_norm"]]], "accuracy-table",
                               [{"key": "labelled"}, {"key": "accuracy"},
                                {"key": "accuracy_norm"}]))
        else:
            parts.append("<p>No labels in this job (--label-field).</p>")
        wrong = []
        for path in data.shards(self.root):
            for batch in data.iter_batches(path, ["id", "correct", "pred", "pred_norm",
                                                  "choice_logprobs"]):
                for i, ok in enumerate(batch["correct"]):
                    if ok is False and len(wrong) < 10 * self.n:
                        wrong.append({k: batch[k][i] for k in batch})
        parts.append("<h2 id=\"wrong\">Records the model got wrong</h2>")
        parts.append(table(["id", "pred", "pred_norm", "choice log-likelihoods"],
                           [[w["id"], w["pred"], w["pred_norm"],
                             ", ".join(f"{x:.3f}" for x in w["choice_logprobs"])]
                            for w in wrong], "wrong-table", [{"id": w["id"]} for w in wrong]))
        return parts

    # --- filter ----------------------------------------------------------------------------

    def _filter(self) -> list[str]:
        f = self.summary.get("filter") or {}
        rule = f.get("rule") or self.summary.get("filter") or {}
        names = rule.get("names") or []
        counts = f.get("buckets") or self.summary.get("buckets") or {}
        prefix = self.job.get("score_prefix", "lm_")
        column = prefix + rule.get("by", "perplexity")
        text_field = self.job.get("text_field", "text")
        parts = ["<h2 id=\"buckets\">Buckets</h2>",
                 table(["bucket", "records"], [[n, counts.get(n, 0)] for n in names],
                       "bucket-table", [{"bucket": n, "count": counts.get(n, 0)}
                                        for n in names])]
        bucket_paths = {n: data.shards(self.root / n) for n in names}
        paths = [p for n in names for p in bucket_paths[n]]
        cut_sets = rule.get("cut_points") or []
        group_field = rule.get("group_field")
        parts.append(f"<h2 id=\"cuts\">{esc(column)} and the cut points</h2>")
        if cut_sets:
            parts.append(table(["group", "cut points"], [
                ["all" if c["group"] is None else c["group"],
                 ", ".join(f"{x:.6g}" for x in c["cuts"])] for c in cut_sets], "cut-table",
                [{"group": c["group"] or ""} for c in cut_sets]))
        bounds = [(k, rule[k]) for k in ("min_value", "max_value") if rule.get(k) is not None]
        shown = cut_sets[:MAX_GROUPS] if cut_sets else [{"group": None, "cuts": []}]
        for c in shown:
            cuts = [(f"{names[i]} | {names[i + 1]}", v) for i, v in enumerate(c["cuts"])]
            cuts += [(k, v) for k, v in bounds]
            where = (group_field, c["group"]) if group_field and c["group"] is not None \
                else None
            title = column + (f" ({group_field} = {c['group']})" if where else "")
            parts.append(self._value_section(paths, column, title, "perplexity" in column,
                                             cuts, where=where))
        parts.append(self._near_cuts(paths, column, text_field, group_field, shown, bounds))
        return parts

    def _near_cuts(self, paths, column, text_field, group_field, shown, bounds) -> str:
        """For each cut point, the records just below and just above it."""
        cuts = [(c["group"], v) for c in shown for v in c["cuts"]] + [
            (None, v) for _, v in bounds]
        if not cuts:
            return ""
        # Per cut and side, a bounded max-heap by distance: the n nearest records, in order.
        near: dict[tuple[int, bool], list] = {(i, side): [] for i in range(len(cuts))
                                              for side in (False, True)}
        cols = [column, text_field, "id"] + ([group_field] if group_field else [])
        seen = 0
        for path in paths:
            for batch in data.iter_batches(path, cols):
                for j, v in enumerate(batch[column]):
                    v = data.number(v)
                    if v is None:
                        continue
                    seen += 1
                    for i, (g, cut) in enumerate(cuts):
                        if group_field and g is not None and batch[group_field][j] != g:
                            continue
                        heap = near[(i, v > cut)]
                        entry = (-abs(v - cut), -seen, v, batch[text_field][j])
                        if len(heap) < self.n:
                            heapq.heappush(heap, entry)
                        elif entry > heap[0]:
                            heapq.heapreplace(heap, entry)
        parts = ["<h2 id=\"near-cuts\">Records on both sides of each cut point</h2>"]
        for i, (g, cut) in enumerate(cuts):
            title = f"cut {cut:.6g}" + (f" ({group_field} = {g})" if g is not None else "")
            parts.append(f'<h3 id="cut-{safe_id(str(i))}">{esc(title)}</h3>')
            for side, name in ((False, "below"), (True, "above")):
                picks = [(-d, side, v, text) for d, _, v, text
                         in sorted(near[(i, side)], reverse=True)]
                parts += [f'<div class="doc {name}" data-value="{v!r}"><span class="meta">'
                          f'{name}: {esc(column)} {_fmt(v)}</span>{plain(text)}</div>'
                          for _, _, v, text in picks]
        return "".join(parts)

    # --- generate --------------------------------------------------------------------------

    def _generate(self) -> list[str]:
        paths = data.shards(self.root)
        lengths, reasons = data.ValueStats(), {}
        ext = data.Extremes(self.n)
        for s, path in enumerate(paths):
            row = 0
            for batch in data.iter_batches(path, ["token_ids", "finish_reason"]):
                for ids, reason in zip(batch["token_ids"], batch["finish_reason"], strict=True):
                    n = len(ids or [])
                    lengths.add(n)
                    reasons[reason] = reasons.get(reason, 0) + 1
                    ext.add(n, s, row)
                    row += 1
        parts = ["<h2 id=\"lengths\">Generated lengths and finish reasons</h2>"]
        if lengths.count:
            edges = np.linspace(lengths.low - 0.5, lengths.high + 0.5,
                                min(BINS, int(lengths.high - lengths.low) + 1) + 1)
            hist = _length_hist(paths, edges)
            order = sorted(reasons, key=lambda k: -reasons[k])
            parts.append("<div class=\"plots\">" + figure(histogram_svg(
                edges, hist, "generated tokens", False), "hist-lengths") + figure(bar_svg(
                    [str(k) for k in order], [reasons[k] for k in order], "rows"),
                    "finish-reasons") + "</div>")
            parts.append(table(["finish reason", "rows"], [[k, reasons[k]] for k in order],
                               "finish-table", [{"reason": k, "count": reasons[k]}
                                                for k in order]))
        rows = self._fetch(paths, ext.sampled)
        parts += [legend(), "<h2 id=\"samples\">Sample continuations</h2>"]
        for key in ext.sampled:
            r = rows[key]
            ids = r.get("token_ids") or []
            parts.append(
                f'<div class="doc" data-id="{esc(r.get("id"))}"><span class="meta">id '
                f'{esc(r.get("id"))} · sample {esc(r.get("sample_index"))} · '
                f'{esc(r.get("finish_reason"))}</span><b>{plain(r.get("prompt"))}</b>'
                f'{token_spans(self._pieces(ids), r.get("token_logprobs") or [])}</div>')
        return parts


def _job_defaults() -> dict[str, Any]:
    import dataclasses

    from pipeline.config import JobConfig

    return dataclasses.asdict(JobConfig())
