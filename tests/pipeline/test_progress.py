"""Progress output of a real CLI run: plain lines on a pipe, a tqdm bar on a pseudo-terminal,
nothing with --no-progress; every input format gets its share of the input read."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _corpus(tmp_path: Path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"river stone {i} " * 3}) + "\n"
                           for i in range(300)))
    return src


def _cmd(src: Path, out: Path, ck: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "score", "--input", str(src), "--output",
            str(out), "--model", str(ck), "--max-tokens-per-batch", "256", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", GPT2_PIPELINE_PROGRESS_S="0",
                PYTHONPATH=str(REPO))


def test_plain_lines_on_a_pipe(tmp_path, tiny_checkpoint):
    src = _corpus(tmp_path)
    proc = subprocess.run(_cmd(src, tmp_path / "o", tiny_checkpoint), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[gpt2-pipeline]")]
    assert lines and "\r" not in proc.stderr
    assert "of the input read, ETA" in lines[-1] and "300 records" in lines[-1]
    quiet = subprocess.run(_cmd(src, tmp_path / "q", tiny_checkpoint, "--no-progress"),
                           env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0
    assert "[gpt2-pipeline]" not in quiet.stderr and "records in:" in quiet.stderr


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="this platform has no "
                    "pseudo-terminals (pty.openpty), so no terminal can be simulated")
def test_a_bar_on_a_terminal(tmp_path, tiny_checkpoint):
    src = _corpus(tmp_path)
    main, secondary = pty.openpty()
    # A real terminal has a size; a fresh pseudo-terminal reports 0 x 0, where tqdm draws nothing.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(_cmd(src, tmp_path / "o", tiny_checkpoint), env=_env(), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "gpt2-pipeline:" in text and "\r" in text and "100%" in text
    assert "records, " in text and "tokens/s" in text
