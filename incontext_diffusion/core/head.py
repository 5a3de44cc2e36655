"""The head contract: what the shared trainer needs from a paper's head, and the head registry.

A head turns a recipe into trainable modules, a dataset and a loss, and exports what it trained.
The trainer (core/trainer.py) knows nothing paper-specific. Heads are found through the
entry-point group `incontext_diffusion.heads`, so a third-party package can add one.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..errors import UserError
from ..recipes import Recipe, validate


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Head:
    """Base class of a head. Subclasses set `Options` (the schema of the recipe's `model:` section)
    and implement `build`, `trainable`, `train_dataset`, `loss` and `export`."""

    Options: type[BaseModel] = NoOptions
    has_unused_parameters = False  # True: DDP must look for parameters without gradients each step

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.options: Any = validate(self.Options, recipe.model, f"recipe {recipe.name}", prefix="model.")

    # --- building ---------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the backbone and build the modules (called once, before `trainable`)."""
        raise NotImplementedError

    def trainable(self) -> torch.nn.Module:
        """The one module the optimiser updates and checkpoints hold (a ModuleDict if several)."""
        raise NotImplementedError

    def frozen(self) -> list[torch.nn.Module]:
        """Frozen modules: moved to the device and, under mixed precision, cast to the half dtype."""
        return []

    def parameter_groups(self, model: torch.nn.Module, learning_rate: float) -> list[dict]:
        """Optimiser parameter groups; override for per-module learning rates."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate}]

    def lr_lambda(self, max_steps: int) -> Callable[[int], float] | None:
        """A learning-rate factor per optimiser step that replaces `train.lr_scheduler` (a paper's own
        schedule); None keeps the recipe's."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        model = self.trainable()
        for module in model.modules():
            if hasattr(module, "enable_gradient_checkpointing") and module is not model:
                module.enable_gradient_checkpointing()

    # --- data and loss ----------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, samples: list) -> Any:
        return torch.utils.data.default_collate(samples)

    def cache_features(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-sample tensors for `icd data cache`: what `collate` and `loss` need from one batch, with the
        frozen encoders' outputs precomputed. A cached sample must come back through `collate` and `loss`."""
        raise UserError(f"the {self.recipe.head} head has nothing to cache: train it from its data (remove data.cache)")

    def loss(self, model: torch.nn.Module, batch: Any, step: int) -> torch.Tensor:
        """The training loss of one batch. `model` is the prepared (maybe DDP-wrapped) trainable."""
        raise NotImplementedError

    # --- validation and export --------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: torch.nn.Module, step: int) -> Image.Image | None:
        """A picture of what the model does now (a sample grid), or None."""
        return None

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write a self-contained model dir (diffusers layout, safetensors) that `icd infer` loads."""
        raise NotImplementedError

    def model_card(self) -> str:
        """The body of the exported README.md."""
        return f"Trained by incontext_diffusion with the recipe `{self.recipe.name}` (see recipe.yaml).\n"


def available_heads() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="incontext_diffusion.heads")}


def load_head(recipe: Recipe) -> Head:
    """Instantiate the head a recipe names; its `model:` options are validated here."""
    heads = available_heads()
    if recipe.head not in heads:
        close = difflib.get_close_matches(recipe.head, list(heads), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown head '{recipe.head}' in recipe {recipe.name}: {hint}available: {', '.join(sorted(heads))}")
    return heads[recipe.head].load()(recipe)
