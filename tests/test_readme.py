"""The README's Python API example runs as written (on a local tiny checkpoint, offline)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tiny_checkpoint, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    api = [b for b in blocks if "gpt2model.GPT2LMHeadModel" in b]  # the API tour, not lm-eval's
    assert len(api) == 1
    code = api[0]
    assert 'path = "gpt2"' in code
    code = code.replace('path = "gpt2"', f"path = {str(tiny_checkpoint)!r}")
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "(1, 3, 50257)" in out  # logits of 'The Manhattan bridge'
    assert out.count("length") + out.count("eos") + out.count("stop") >= 2  # two samples
