"""Issue #19: progress bars (shards.progress) on a terminal only; the outputs do not depend on it.

Real CLIs in a fresh interpreter, once with stderr on a pseudo-terminal (python's ``pty``) and once on a
pipe: the bar (with its rate) appears on the terminal, nothing of it in the pipe, and every output file and
stdout are byte-identical.
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, export_untrained, tiny_config

BAR_CONTROL = "\r"  # tqdm redraws its line with carriage returns


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MULTICLIP_PROGRESS"}  # the terminal rule decides
    return {**env, "PYTHONPATH": str(ROOT)}


def run_on_terminal(cmd: list[str], columns: int | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) with stderr on a pseudo-terminal (``columns`` wide; None: never sized, 0x0)."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # concurrently: a full terminal buffer would block the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def run_on_pipe(cmd: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def image_folders(root: Path, per_class: int = 40) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (i * 5 % 256, 80 if label == "cat" else 160, 7)).save(root / label / f"{i}.png")
    return root


def test_conversion_bar_on_a_terminal_only_and_the_same_shards(tmp_path):
    """``python -m shards.convert folder``: a bar with a rate on a terminal (one never sized, as ``script``
    or some CI runners leave it), nothing of it on a pipe; the shards, summary and stdout are identical."""
    images = image_folders(tmp_path / "images")

    def convert(out: Path) -> list[str]:
        return [sys.executable, "-m", "shards.convert", "folder", "--root", str(images), "--out", str(out),
                "--shard-size", "30"]

    code, out_tty, err_tty = run_on_terminal(convert(tmp_path / "tty"))
    assert code == 0, err_tty[-2000:]
    assert re.search(r"convert: 80record \[[^\]]*\d+\.\d+record/s\]", err_tty), err_tty[-2000:]
    code, out_pipe, err_pipe = run_on_pipe(convert(tmp_path / "pipe"))
    assert code == 0, err_pipe[-2000:]
    assert "convert:" not in err_pipe and "record/s" not in err_pipe and BAR_CONTROL not in err_pipe, err_pipe
    assert out_tty == out_pipe and '"written": 80' in out_pipe
    assert files_of(tmp_path / "tty") == files_of(tmp_path / "pipe")
    # --no-progress silences a terminal too
    code, _, err_quiet = run_on_terminal(convert(tmp_path / "quiet") + ["--no-progress"], columns=100)
    assert code == 0 and "convert:" not in err_quiet, err_quiet[-2000:]


@pytest.fixture(scope="module")
def retrieval_export(tmp_path_factory) -> tuple[Path, Path]:
    """(val shards, export folder) of a fresh, untrained tiny retrieval model (no training run needed)."""
    from shards.synth import generate
    from training.validation import config_from_dict

    base = tmp_path_factory.mktemp("progress")
    generate(base / "shards", task="retrieval", n_train=4, n_val=48, seed=0, shard_size=16, image_size=64)
    export_untrained(config_from_dict(tiny_config(base / "shards", base / "run")), base / "export")
    return base / "shards" / "val", base / "export"


def test_inference_bar_on_a_terminal_only_and_the_same_predictions(retrieval_export, tmp_path):
    """``launch/infer.py``: the bar counts items against the total with a rate and an ETA on a terminal,
    nothing of it on a pipe; every file it writes and its stdout are identical."""
    shards, export = retrieval_export

    def infer(out: Path) -> list[str]:
        return [sys.executable, "launch/infer.py", "--model", str(export), "--shards", str(shards),
                "--out", str(out), "--batch-size", "8", "--providers", "cpu"]

    code, out_tty, err_tty = run_on_terminal(infer(tmp_path / "tty"), columns=120)
    assert code == 0, err_tty[-3000:]
    assert re.search(r"infer: 100%\|[^|]*\| 48/48 \[[^\]]*\d+\.\d+item/s\]", err_tty), err_tty[-3000:]
    assert re.search(r"infer: +\d+%\|[^|]*\| \d+/48 \[\d\d:\d\d<\d\d:\d\d", err_tty), err_tty[-3000:]  # an ETA
    code, out_pipe, err_pipe = run_on_pipe(infer(tmp_path / "pipe"))
    assert code == 0, err_pipe[-3000:]
    assert "infer:" not in err_pipe and "item/s" not in err_pipe and BAR_CONTROL not in err_pipe, err_pipe[-3000:]
    assert out_tty == out_pipe and '"predicted": 48' in out_pipe
    assert files_of(tmp_path / "tty") == files_of(tmp_path / "pipe")


def test_flag_then_environment_then_terminal(monkeypatch):
    """The rule itself: --progress/--no-progress over MULTICLIP_PROGRESS over "is stderr a terminal"."""
    from shards import progress

    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        monkeypatch.delenv(progress.ENV, raising=False)
        monkeypatch.setattr(progress, "_override", None)
        assert progress.progress_enabled(terminal) and not progress.progress_enabled(io.StringIO())
        monkeypatch.setenv(progress.ENV, "off")
        assert not progress.progress_enabled(terminal)
        monkeypatch.setenv(progress.ENV, "on")
        assert progress.progress_enabled(io.StringIO())
        progress.set_progress(False)  # the CLI flag
        assert not progress.progress_enabled(terminal)
        progress.set_progress(None)
        monkeypatch.setenv(progress.ENV, "sometimes")
        with pytest.raises(ValueError, match="MULTICLIP_PROGRESS='sometimes'"):
            progress.progress_enabled(terminal)
    finally:
        terminal.close()
        os.close(master)
