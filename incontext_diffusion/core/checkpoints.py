"""Training checkpoints: atomic save, verified resume, pruning, the exported model dir, the run lock.

A checkpoint is `run_dir/checkpoints/checkpoint-{step}/`: accelerate's state (model weights as
safetensors, optimiser, LR scheduler) plus, in safetensors, the torch RNG states and the EMA
weights, and `trainer_state.json` (which also lists every file of the checkpoint with its size).
It is written into a temporary folder and renamed when complete, so a kill during a save never
leaves a broken checkpoint: only renamed folders count. A checkpoint damaged later (a disk error,
a copy cut short) is found by `verify_checkpoint`, and `--resume latest` falls back to the newest
intact one. While a run trains, `run_dir/train.lock` names the process that holds the folder.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError, is_user_os_error, user_os_error
from ..recipes import Recipe

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
LOCK_FILE = "train.lock"
NEARLY_FULL_BYTES = 4 * 2**20  # a write that failed with less free space than this failed for lack of space


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def verify_checkpoint(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing or cut file, unreadable weights or state), or None."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} is unreadable ({type(error).__name__})"
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "batches_seen")):
        return f"{TRAINER_STATE} has no step and batches_seen"
    for name, size in state.get("files", {}).items():  # checkpoints written before the list was kept have none
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # header and offsets only; no tensor is read
                    weights.get_slice(key)
        except Exception as error:  # safetensors raises its own error type
            return f"{file.name} is unreadable ({str(error).splitlines()[0]})"
    return None


def resolve_resume(run_dir: Path, resume: str, say=print) -> Path:
    """`latest` -> the newest intact checkpoint of the run (broken newer ones are named by `say`);
    otherwise a checkpoint folder path, which must be intact."""
    if resume != "latest":
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise UserError(f"--resume {resume}: not a complete checkpoint folder (no {TRAINER_STATE}): pass 'latest' or a checkpoint-N folder")
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"--resume {resume}: the checkpoint is broken ({problem}): pass --resume latest or an older checkpoint-N folder")
        return path
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'}: start without --resume")
    broken = []
    for checkpoint in reversed(found):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            if broken:
                say(f"warning: {'; '.join(broken)}: resuming from {checkpoint.name}, the newest intact one")
            return checkpoint
        broken.append(f"{checkpoint.name} is broken ({problem})")
    raise UserError(f"--resume latest: every checkpoint in {Path(run_dir) / 'checkpoints'} is broken ({'; '.join(broken)}): "
                    "start again without --resume in a new output_dir")


def clean_stale_temps(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written: `.checkpoint-K.tmp` and `.model.tmp` folders.

    A `.model.old` left between the two renames of an export goes back into place if `model/` is
    missing, else it is removed. Call it while holding the run's lock. Returns what was removed.
    """
    run_dir = Path(run_dir)
    stale = sorted((run_dir / "checkpoints").glob(f".{CHECKPOINT_PREFIX}*.tmp")) if (run_dir / "checkpoints").is_dir() else []
    stale += [p for p in run_dir.glob(".*.tmp") if p.is_dir()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    for old in (p for p in run_dir.glob(".*.old") if p.is_dir()):
        _restore_or_drop_old(old, run_dir / old.name[1 : -len(".old")])
    return stale


def _restore_or_drop_old(old: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, out_dir)


def _write_failure(error: Exception, path: Path) -> UserError | None:
    """The one-line error for a failed write the user can fix (disk full, permissions), else None.

    A full disk shows up as an OSError, as safetensors' own error, or as torch's RuntimeError from its
    zip writer; the free space left tells those apart from a bug.
    """
    if is_user_os_error(error):
        return user_os_error(error, path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    full = "No space left" in str(error) or (existing is not None and shutil.disk_usage(existing).free < NEARLY_FULL_BYTES)
    if full:
        return UserError(f"cannot write '{path}' (no space left on the disk): free space on that disk or set output_dir on another one")
    return None


def _written_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != TRAINER_STATE}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = state
    return states


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, state: dict, ema=None, keep: int = 2) -> Path:
    """Save on every rank (DeepSpeed's save is collective); rename and prune on rank 0 only."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    temp = folder / f".{CHECKPOINT_PREFIX}{step}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temp), safe_serialization=True)
        # accelerate also pickles its RNG states; ours are safetensors so resuming never unpickles.
        save_file(_rng_tensors(), str(temp / f"rng_state_{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()  # every rank's files are in place before the rename
        if accelerator.is_main_process:
            if ema is not None:
                save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}, str(temp / "ema.safetensors"))
                state = {**state, "ema_optimization_step": ema.optimization_step, "ema_decay": ema.decay}
            # The list of files and sizes lets a resume tell a complete checkpoint from a damaged one.
            (temp / TRAINER_STATE).write_text(json.dumps({**state, "files": _written_files(temp)}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
    except Exception as error:
        failure = _write_failure(error, temp)
        shutil.rmtree(temp, ignore_errors=True)
        if failure is None:
            raise
        previous = list_checkpoints(run_dir)
        raise UserError(f"{failure}; checkpoint {step} was not written (last good checkpoint: {previous[-1] if previous else 'none'})") from None
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema=None) -> dict:
    """Restore model, optimiser, scheduler, RNG and EMA; return the trainer state (step, epoch...)."""
    accelerator.load_state(str(checkpoint))
    _restore_rng(load_file(str(checkpoint / f"rng_state_{accelerator.process_index}.safetensors")))
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if ema is not None:
        shadow = load_file(str(checkpoint / "ema.safetensors"))
        for i, param in enumerate(ema.shadow_params):
            param.data.copy_(shadow[f"shadow.{i}"].to(param.device))
        ema.optimization_step = state["ema_optimization_step"]
    return state


def write_model_card(out_dir: Path, recipe: Recipe, body: str) -> None:
    """The exported dir carries the recipe that made it and a model card."""
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    card = f"---\nlibrary_name: diffusers\ntags: [incontext_diffusion, {recipe.head}]\n---\n\n# {recipe.name}\n\n{recipe.description}\n\n{body}"
    (out_dir / "README.md").write_text(card)


def atomic_export(out_dir: Path, write) -> Path:
    """Run `write(temp_dir)` and move the result into place only when it completed.

    The swap never leaves a moment without a complete `out_dir`: the old one is renamed aside, the
    new one renamed in, then the old one deleted.
    """
    out_dir = Path(out_dir)
    temp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists():  # a swap interrupted between its two renames
        _restore_or_drop_old(old, out_dir)
    try:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        write(temp)
    except Exception as error:
        failure = _write_failure(error, temp)
        shutil.rmtree(temp, ignore_errors=True)
        if failure is None:
            raise
        raise UserError(f"{failure}; {out_dir} was not written") from None
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(temp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


class RunLock:
    """`run_dir/train.lock` while a training runs: which process (pid, host) holds the folder.

    A second training into the same folder is refused with one line naming the holder; the lock of
    a process that died on this host (killed, out of memory) is stale and is taken over. The lock
    is released at the end of the run, or when the process exits.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise user_os_error(error, self.path.parent, "cannot create the run folder") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                with open(self.path, "x") as file:
                    json.dump(me, file)
                self.held = True
                atexit.register(self.release)
                return self
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    raise UserError(
                        f"{self.path.parent} is in use by another training (pid {holder['pid']} on {holder['host']}, since {holder.get('since', '?')}): "
                        f"wait for it to end or choose another output_dir (--set output_dir=...); if that process is gone, delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)
            except OSError as error:
                raise user_os_error(error, self.path, "cannot write the run lock") from None
        raise UserError(f"{self.path} keeps coming back: another training is starting in {self.path.parent}: choose another output_dir")

    def _holder(self) -> dict:
        for _ in range(3):  # a lock being written this instant is briefly empty
            try:
                holder = json.loads(self.path.read_text())
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return {}

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        """An unreadable lock, or one held by a process of this host that no longer runs (or by us)."""
        if not holder:
            return True
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: we cannot tell, so it holds the folder
        if holder["pid"] == os.getpid():
            return True  # an earlier run in this same process (e.g. an interrupted call in Python)
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)
            atexit.unregister(self.release)
