"""`gpt2-pipeline report` on real job outputs (tiny checkpoint): numbers on the page against the
output read independently, hostile text, empty outputs; and the page in a real browser.

The page is parsed with the stdlib HTML parser (every table row carries data- attributes), and,
where Debian's `chromium` is installed, loaded headless from a file URL with networking off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline import jobs
from pipeline.config import JobConfig
from pipeline.formats import InputError
from pipeline.report import build_report
from pipeline.writers import read_output

HOSTILE = [
    "<script>window.pwned = 1; fetch('https://evil.example/x')</script> hello",
    '<img src="https://evil.example/i.png" onerror="alert(1)"> an image tag',
    "\u202eRTL override and zero\u200bwidth\u200d joiners \u2067isolate\u2069",
    "averyveryveryverylongwordwithoutanyspaces" * 30,
    "plain text about rivers and stones",
    "& ampersands &amp; entities &lt;b&gt;",
]


class Page(HTMLParser):
    """Elements by id, rows with their data- attributes, and every tag/attribute seen."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.rows: dict[str, list[dict]] = {}
        self.tags: list[tuple[str, dict]] = []
        self.docs: dict[str, list[str]] = {}
        self._table: list[str] = []
        self._section = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table.append(a.get("id", ""))
        if tag == "div" and a.get("class") == "examples":
            self._section = a.get("id", "")
        if tag == "tr" and self._table:
            data = {k[5:]: v for k, v in a.items() if k.startswith("data-")}
            if data:
                self.rows.setdefault(self._table[-1], []).append(data)
        if tag == "div" and "doc" in (a.get("class") or "") and "data-id" in a:
            self.docs.setdefault(self._section, []).append(a["data-id"])

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _texts(n: int, seed: int) -> list[str]:
    words = ["river", "stone", "quiet", "market", "winter", "lantern", "orbit", "ember", "7", "!"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def score_output(tmp_path_factory, tiny_checkpoint) -> Path:
    tmp = tmp_path_factory.mktemp("report-score")
    rows = [{"id": f"d{i}", "text": t, "lang": "en" if i % 3 else "xx"}
            for i, t in enumerate(_texts(40, 1) + HOSTILE)]
    rows.append({"id": "bad", "text": 42})  # one error row
    src = _write_jsonl(tmp / "in" / "docs.jsonl", rows)
    jobs.run(JobConfig(input=src, output=str(tmp / "out"), model=str(tiny_checkpoint),
                       id_field="id", keep_fields=("lang",), top_logprobs=3, progress=False,
                       report=True))
    return tmp / "out"


def test_score_report_numbers_equal_the_output(score_output):
    page_path = score_output / "report.html"
    assert page_path.is_file()  # written by --report
    text = page_path.read_text()
    page = Page(text)
    rows = read_output(str(score_output))
    ppl = np.array([r["perplexity"] for r in rows])
    summary = {r["key"]: r for r in page.rows["summary"]}
    assert {"input_records", "result_records", "error_records"} <= set(summary)
    q = {float(r["q"]): r for r in page.rows["quantiles"]}
    for qq, r in q.items():
        assert float(r["perplexity"]) == pytest.approx(np.quantile(ppl, qq), rel=1e-9)
    order = np.argsort(ppl, kind="stable")
    ids = [rows[i]["id"] for i in order]
    assert page.docs["ex-lowest"] == ids[:5]
    assert page.docs["ex-highest"] == ids[::-1][:5] or sorted(page.docs["ex-highest"]) == sorted(
        ids[::-1][:5])
    assert len(page.docs["ex-sampled"]) == 5
    assert {"hist-perplexity", "hist-bits_per_byte"} <= page.ids
    assert text.count('class="tok"') > 50  # heat-map spans
    errors = page.rows["error-reasons"]
    assert sum(int(e["count"]) for e in errors) == 1


def test_hostile_text_shows_as_text_and_runs_nothing(score_output, tmp_path):
    text = (score_output / "report.html").read_text()
    page = Page(text)
    assert not [t for t, _ in page.tags if t == "script"]
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]
    assert not [a for t, a in page.tags if t == "img"]
    assert "evil.example" not in "".join(a.get("src", "") + a.get("href", "")
                                         for _, a in page.tags)
    assert "&lt;script&gt;" in text or "&lt;" in text
    assert len(text) < 3_000_000


def test_group_field_gives_per_group_quantiles(score_output, tmp_path):
    out = build_report(score_output, tmp_path / "g.html", group_field="lang")
    page = Page(out.read_text())
    groups = {r["group"] for r in page.rows["groups-perplexity"]}
    assert groups == {"en", "xx"}


def test_report_refuses_an_unfinished_output(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="not a finished job output"):
        build_report(tmp_path / "half")


def test_filter_report_shows_buckets_and_cut_points(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "in" / "a.jsonl",
                       [{"text": t} for t in _texts(30, 2)])
    summary = jobs.run(JobConfig(mode="filter", input=src, output=str(tmp_path / "f"),
                                 model=str(tiny_checkpoint), quantiles=(0.3, 0.7),
                                 bucket_names=("head", "middle", "tail"), progress=False))
    page = Page(build_report(tmp_path / "f").read_text())
    counts = {r["bucket"]: int(r["count"]) for r in page.rows["bucket-table"]}
    assert counts == summary.buckets
    assert "hist-lm_perplexity" in page.ids and "near-cuts" in page.ids
    marker = json.loads((tmp_path / "f" / "_SUCCESS").read_text())
    cuts = marker["filter"]["rule"]["cut_points"][0]["cuts"]
    html_text = (tmp_path / "f" / "report.html").read_text()
    below = [float(v) for v in _attr_values(html_text, "doc below", "data-value")]
    above = [float(v) for v in _attr_values(html_text, "doc above", "data-value")]
    assert below and above
    assert all(v <= max(cuts) for v in below) and all(v > min(cuts) for v in above)


def _attr_values(text: str, cls: str, attr: str) -> list[str]:
    import re

    return re.findall(rf'class="{cls}" {attr}="([^"]+)"', text)


def test_generate_report_shows_lengths_and_finish_reasons(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "in" / "p.jsonl",
                       [{"prompt": t} for t in _texts(6, 3)])
    jobs.run(JobConfig(mode="generate", input=src, output=str(tmp_path / "g"),
                       model=str(tiny_checkpoint), max_new_tokens=6, num_samples=2,
                       temperature=0.9, seed=1, progress=False))
    page = Page(build_report(tmp_path / "g").read_text())
    rows = read_output(str(tmp_path / "g"))
    reasons = {r["reason"]: int(r["count"]) for r in page.rows["finish-table"]}
    want: dict[str, int] = {}
    for r in rows:
        want[r["finish_reason"]] = want.get(r["finish_reason"], 0) + 1
    assert reasons == want
    assert {"hist-lengths", "finish-reasons"} <= page.ids


def test_multiple_choice_report_shows_accuracy_and_wrong_records(tmp_path, tiny_checkpoint):
    docs = [{"id": f"q{i}", "q": "Pick:", "choices": ["yes", "no", "maybe"], "label": i % 3}
            for i in range(6)]
    src = _write_jsonl(tmp_path / "in" / "mc.jsonl", docs)
    summary = jobs.run(JobConfig(input=src, output=str(tmp_path / "mc"), id_field="id",
                                 model=str(tiny_checkpoint), context_field="q",
                                 choices_field="choices", label_field="label", progress=False))
    page = Page(build_report(tmp_path / "mc").read_text())
    acc = {r["key"] for r in page.rows["accuracy-table"]}
    assert acc == {"labelled", "accuracy", "accuracy_norm"}
    wrong = {r["id"] for r in page.rows.get("wrong-table", [])}
    rows = read_output(str(tmp_path / "mc"))
    assert wrong == {r["id"] for r in rows if not r["correct"]}
    assert len(wrong) == round((1 - summary.accuracy) * 6)


def test_empty_and_errors_only_outputs(tmp_path, tiny_checkpoint):
    empty = _write_jsonl(tmp_path / "in" / "empty.jsonl", [])
    jobs.run(JobConfig(input=empty, output=str(tmp_path / "e"), model=str(tiny_checkpoint),
                       progress=False))
    assert "No perplexity" in build_report(tmp_path / "e").read_text()
    bad = _write_jsonl(tmp_path / "in2" / "bad.jsonl", [{"text": 1}, {"other": "x"}])
    jobs.run(JobConfig(input=bad, output=str(tmp_path / "b"), model=str(tiny_checkpoint),
                       progress=False))
    page = Page(build_report(tmp_path / "b").read_text())
    assert sum(int(e["count"]) for e in page.rows["error-reasons"]) == 2


def test_a_megabyte_document(tmp_path, tiny_checkpoint):
    src = _write_jsonl(tmp_path / "in" / "big.jsonl", [{"text": "river stone " * 90_000}])
    jobs.run(JobConfig(input=src, output=str(tmp_path / "big"), model=str(tiny_checkpoint),
                       progress=False, summary_only=False))
    out = build_report(tmp_path / "big")
    assert out.stat().st_size < 1_000_000
    assert "more tokens" in out.read_text()


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get "
                    "install chromium; .ci/run installs it)")
def test_the_page_in_headless_chromium(score_output, tmp_path):
    page = score_output / "report.html"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
             "--enable-logging=stderr", "--v=1", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, "--window-size=1280,2000", f"--screenshot={shot}",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Page(dom.stdout)
    assert {"hist-perplexity", "quantiles", "summary"} <= parsed.ids
    assert dom.stdout.count('class="tok"') > 50
    assert not [t for t, _ in parsed.tags if t == "script"]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert console == [], console
    # Nothing but the file itself was requested: the log names every URL the page loaded.
    requested = [ln for ln in dom.stderr.splitlines()
                 if ("http://" in ln or "https://" in ln) and "evil.example" in ln]
    assert requested == [], requested
