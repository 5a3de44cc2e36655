"""Training checkpoints: atomic save, resume, pruning, and the exported model dir.

A checkpoint is `run_dir/checkpoints/checkpoint-{step}/`: accelerate's state (model weights as
safetensors, optimiser, LR scheduler) plus, in safetensors, the torch RNG states and the EMA
weights, and `trainer_state.json`. It is written into a temporary folder and renamed when complete,
so a kill during a save never leaves a broken checkpoint: only renamed folders count.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..recipes import Recipe

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint of the run; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"--resume latest: no checkpoint in {Path(run_dir) / 'checkpoints'}: start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint folder (no {TRAINER_STATE}): pass 'latest' or a checkpoint-N folder")
    return path


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
        (temp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
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
    """Run `write(temp_dir)` and move the result into place only when it completed."""
    out_dir = Path(out_dir)
    temp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    write(temp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temp, out_dir)
    return out_dir
