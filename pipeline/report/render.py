"""HTML pieces of the report: escaped text, tables, token heat maps and plots as inline SVG.

Plots are drawn by matplotlib and embedded as SVG text: a well-kept library (axes, ticks, log
scales done right) with no JavaScript or network at view time, and `svg.fonttype: none` keeps
labels as text, so a plot is a few tens of kB. Every string from the corpus goes through
`html.escape`; the page has no scripts at all.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_TOKENS_SHOWN = 400  # per example document; the rest is counted, not shown
MAX_CHARS_SHOWN = 2000  # per plain-text example (prompts, records without token lists)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1em 2em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.doc{border:1px solid #ddd;border-radius:4px;padding:.5em;margin:.6em 0;overflow-wrap:anywhere;
white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.doc .meta{font-family:system-ui,sans-serif;color:#555;display:block;margin-bottom:.3em}
.tok{border-radius:2px}.tok:hover{outline:1px solid #000}
.more{color:#777;font-style:italic}figure{margin:.5em 0}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{flex:1 1 480px}
.legend span{display:inline-block;padding:0 6px;margin-right:2px}
"""


def esc(text: Any) -> str:
    """Text from the corpus, safe as HTML content or attribute value."""
    return html.escape("" if text is None else str(text), quote=True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "",
          row_attrs: Sequence[dict[str, Any]] | None = None) -> str:
    """A table; numbers right-aligned; `row_attrs` become data- attributes (for tests/tools)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header) if any(header) else ""
    body = []
    for i, row in enumerate(rows):
        attrs = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (row_attrs or [{}] * len(rows))
                        [i].items())
        cells = "".join(f'<td class="num">{esc(_num(c))}</td>' if isinstance(c, int | float)
                        and not isinstance(c, bool) else f"<td>{esc(c)}</td>" for c in row)
        body.append(f"<tr{attrs}>{cells}</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    head = f"<tr>{head}</tr>" if head else ""
    return f"<table{ident}>{head}{''.join(body)}</table>"


def _num(x: float) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.6g}" if abs(x) < 1e6 else f"{x:,.0f}"


def logprob_color(lp: float | None) -> str:
    """Background colour of a token: red for surprising (low log-prob), green for expected."""
    if lp is None or not math.isfinite(lp):
        return "#eeeeee"
    from matplotlib import colormaps

    rgb = colormaps["RdYlGn"](min(1.0, max(0.0, 1.0 + lp / 12.0)))[:3]
    # Lightened towards white, so dark text stays readable on every colour.
    r, g, b = (int(255 * (0.5 * c + 0.5)) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def token_spans(pieces: Sequence[str], logprobs: Sequence[float | None],
                tops: Sequence[Any] | None = None) -> str:
    """Per-token spans coloured by log-prob; hover shows it and the top alternatives."""
    out = []
    for i, (text, lp) in enumerate(zip(pieces[:MAX_TOKENS_SHOWN], logprobs, strict=False)):
        title = "unscored" if lp is None else f"log p = {lp:.3f}"
        if tops is not None and i < len(tops) and tops[i]:
            title += "; top: " + ", ".join(f"{t!r} {v:.2f}" for t, v in tops[i])
        out.append(f'<span class="tok" style="background:{logprob_color(lp)}" '
                   f'title="{esc(title)}" data-logprob="{"" if lp is None else lp}">'
                   f"{esc(text)}</span>")
    if len(pieces) > MAX_TOKENS_SHOWN:
        out.append(f'<span class="more"> … {len(pieces) - MAX_TOKENS_SHOWN:,} more tokens'
                   "</span>")
    return "".join(out)


def plain(text: Any) -> str:
    text = "" if text is None else str(text)
    more = (f'<span class="more"> … {len(text) - MAX_CHARS_SHOWN:,} more characters</span>'
            if len(text) > MAX_CHARS_SHOWN else "")
    return esc(text[:MAX_CHARS_SHOWN]) + more


def legend() -> str:
    cells = "".join(f'<span style="background:{logprob_color(v)}">{v}</span>'
                    for v in (-12, -9, -6, -3, -1, 0))
    return f'<p class="legend">token colour = log-prob: {cells} (hover a token for details)</p>'


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline SVG


def histogram_svg(edges: np.ndarray, counts: np.ndarray, xlabel: str, log_x: bool,
                  cuts: Sequence[tuple[str, float]] = ()) -> str:
    """A histogram as inline SVG, with vertical lines at `cuts` (label, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "gpt2-pipeline"})
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    if counts.sum():
        ax.stairs(counts, edges, fill=True, color="#4c78a8")
    for label, value in cuts:
        ax.axvline(value, color="#d62728", linewidth=1.2)
        ax.annotate(label, (value, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="#d62728")
    if log_x and edges[0] > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("records")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def bar_svg(labels: Sequence[str], values: Sequence[int], xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "gpt2-pipeline"})
    fig, ax = plt.subplots(figsize=(6.4, 0.4 + 0.35 * max(1, len(labels))))
    ax.barh(list(labels), list(values), color="#4c78a8")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def figure(svg: str, name: str) -> str:
    return f'<figure class="plot" id="{esc(name)}">{svg}</figure>'


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:60] or "x"


def fmt(x: Any) -> str:
    """A number for the page (6 significant digits), or '-' for none."""
    if x is None:
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return esc(x)
    return f"{v:.6g}" if math.isfinite(v) else str(v)
