"""Checkpoints that went bad, stale temporaries, the export swap, the run lock and a full disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_helpers import error_lines, run_icd, small_filesystem
from incontext_diffusion.core import checkpoints
from incontext_diffusion.core.checkpoints import RunLock, atomic_export, clean_stale_temps, resolve_resume, verify_checkpoint
from incontext_diffusion.core.images import save_image
from incontext_diffusion.errors import UserError


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint writes it: weights, state, and the list of files."""
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "optimizer.bin").write_bytes(b"x" * 100)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "batches_seen": step, "files": files}))
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    assert verify_checkpoint(fake_checkpoint(tmp_path, 2)) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: (f / "optimizer.bin").unlink(), "optimizer.bin is missing"),
        (lambda f: (f / "optimizer.bin").write_bytes(b"x" * 10), "optimizer.bin has 10 bytes, 100 were written"),
        (lambda f: (f / "trainer_state.json").write_text("{garbage"), "trainer_state.json is unreadable"),
        (lambda f: (f / "trainer_state.json").write_text('{"step": "two"}'), "has no step and batches_seen"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-16]), "model.safetensors"),
    ],
)
def test_a_damaged_checkpoint_says_what_is_wrong(tmp_path, damage, reason):
    folder = fake_checkpoint(tmp_path, 2)
    damage(folder)
    assert reason in verify_checkpoint(folder)


def test_a_cut_safetensors_is_caught_without_the_file_list(tmp_path):
    """Checkpoints written before the file list was kept are still checked for readable weights."""
    folder = fake_checkpoint(tmp_path, 2)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "batches_seen": 2}))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-16])
    assert "model.safetensors is unreadable" in verify_checkpoint(folder)


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    four = fake_checkpoint(tmp_path, 4)
    six = fake_checkpoint(tmp_path, 6)
    (six / "optimizer.bin").unlink()
    said = []
    assert resolve_resume(tmp_path, "latest", say=said.append) == four
    assert len(said) == 1 and "checkpoint-6 is broken (optimizer.bin is missing)" in said[0] and "resuming from checkpoint-4" in said[0]
    with pytest.raises(UserError, match="the checkpoint is broken"):
        resolve_resume(tmp_path, str(six))


def test_stale_temporaries_are_cleaned_and_an_interrupted_swap_restored(tmp_path):
    (tmp_path / "checkpoints" / ".checkpoint-8.tmp").mkdir(parents=True)
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / ".model.old").mkdir()  # killed between "old aside" and "new in": model/ is missing
    (tmp_path / ".model.old" / "model_index.json").write_text("{}")
    intact = fake_checkpoint(tmp_path, 4)
    removed = clean_stale_temps(tmp_path)
    assert {p.name for p in removed} == {".checkpoint-8.tmp", ".model.tmp"}
    assert (tmp_path / "model" / "model_index.json").is_file() and not (tmp_path / ".model.old").exists()
    assert intact.is_dir()


def test_the_export_swap_always_leaves_a_complete_model(tmp_path, monkeypatch):
    out = tmp_path / "model"
    atomic_export(out, lambda temp: (temp / "weights").write_text("first"))
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append((Path(src).name, Path(dst).name, (out / "weights").is_file() or (tmp_path / ".model.old" / "weights").is_file()))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", watching_replace)
    atomic_export(out, lambda temp: (temp / "weights").write_text("second"))
    # The old model goes aside first, then the new one comes in: a complete model exists at every step.
    assert seen == [("model", ".model.old", True), (".model.tmp", "model", True)]
    assert (out / "weights").read_text() == "second" and not (tmp_path / ".model.old").exists()


def test_a_failed_export_keeps_the_previous_model(tmp_path):
    out = tmp_path / "model"
    atomic_export(out, lambda temp: (temp / "weights").write_text("first"))

    def broken(temp):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left on device"):
        atomic_export(out, broken)
    assert (out / "weights").read_text() == "first" and not (tmp_path / ".model.tmp").exists()


# --- the run lock -------------------------------------------------------------------------------


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "then"}))


def test_a_live_holder_keeps_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_lock(tmp_path, holder.pid)
        with pytest.raises(UserError, match=f"in use by another training \\(pid {holder.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
        write_lock(tmp_path, holder.pid, host="another-machine")
        with pytest.raises(UserError, match="another-machine"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_released(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, gone.pid)
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "train.lock").exists()


def test_a_second_training_into_a_held_folder_is_one_line(tmp_path, monkeypatch, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", holder.pid)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={tmp_path / 'run'}")
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and f"pid {holder.pid}" in lines[0]
        assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()
    finally:
        holder.kill()
        holder.wait()


# --- a training that is resumed from a damaged checkpoint, and a full disk ---------------------------


def test_resume_latest_skips_a_truncated_checkpoint_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    train = ["train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={run}", "--set", "train.max_steps=4", "--set", "train.validate_every=100"]
    code, _, err = run_icd(monkeypatch, capsys, *train)
    assert code == 0, err
    assert not (run / "train.lock").exists()  # released at the end
    weights = run / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    (run / "checkpoints" / ".checkpoint-6.tmp").mkdir()  # what a kill during a save leaves
    code, out, err = run_icd(monkeypatch, capsys, *train[:-4], "--set", "train.max_steps=6", "--set", "train.validate_every=100", "--resume", "latest")
    assert code == 0, err
    said = out + err
    assert "checkpoint-4 is broken" in said and "resuming from checkpoint-2" in said and "resumed from" in said
    assert not (run / "checkpoints" / ".checkpoint-6.tmp").exists()
    assert verify_checkpoint(run / "checkpoints" / "checkpoint-6") is None and (run / "model" / "model_index.json").is_file()


def test_a_full_disk_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    """The micro run's metrics fit in 256 KB, its first checkpoint (about 1.3 MB) does not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    disk = tmp_path / "disk"
    with small_filesystem(disk, size="256k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a tmpfs (the mocked OSError test below still runs)")
        code, _, err = run_icd(monkeypatch, capsys, "train", "--recipe", "tiny_ldm-micro", "--set", f"output_dir={disk / 'run'}", "--set", "train.validate_every=100")
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and "no space left" in lines[0].lower() and "checkpoint 2 was not written" in lines[0], err
        assert list((disk / "run" / "checkpoints").iterdir()) == []  # no half-written checkpoint, no temporary
        assert not (disk / "run" / "model").exists()


def test_a_full_disk_when_saving_an_image_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def no_space(self, fp, format=None, **params):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(UserError, match=f"cannot write '{target}' \\(No space left on device\\): free space"):
        save_image(Image.new("RGB", (4, 4)), target)
    assert list(tmp_path.iterdir()) == []
