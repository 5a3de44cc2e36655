"""Helpers shared by the bad-input and checkpoint tests: run `icd` in-process, small file systems."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from incontext_diffusion import cli


def run_icd(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `icd ARGS` in-process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["icd", *map(str, args)])
    monkeypatch.setattr(cli, "DEBUG", False)
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A localhost port no one listens on now (for a server or a process group a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip()]


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "256k", read_only: bool = False):
    """A tmpfs mounted at `folder` (root only); yields False where it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def kill_at_first_checkpoint(command: list[str], run_dir: Path, env: dict, timeout: float) -> None:
    """Start `python -m incontext_diffusion COMMAND`, SIGKILL it once `run_dir` holds a checkpoint."""
    import signal
    import time

    from incontext_diffusion.core import checkpoints

    process = subprocess.Popen([sys.executable, "-m", "incontext_diffusion", *command], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoints.list_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
