"""The head contract: what a paper's head gives the shared trainer and everything after training.

A head turns a recipe into trainable modules, a dataset and a loss (`build`, `trainable`,
`train_dataset`, `loss`), exports what it trained (`export`), and then owns inference: the
pipeline classes its export writes (`pipeline_classes`; model_index.json's `_class_name` is one
of their names), `pipeline(model)` (the pipeline over a trained model, what `export` saves), and
its CLI commands (infer, eval, extras). The trainer (core/trainer.py) knows nothing paper-specific.

How a head is found (one entry point per head, group `incontext_diffusion.heads`):
    [project.entry-points."incontext_diffusion.heads"]
    my_head = "my_package.my_head.head:MyHead"          # the Head subclass
Its commands live in the module `commands` of the same package as the head's module
(`my_package.my_head.commands`, optional), with one function
    register(app, data_app, convert_app, infer, evaluate)
that fills `infer[class_name] = handler(InferOptions)` and `evaluate[class_name] = handler(EvalOptions)
-> dict` for each pipeline class name, and may add typer commands to the three apps. `icd` imports
these modules (never the heads) at start, so the commands module and its package's `__init__.py`
import nothing heavy (no torch, diffusers or transformers at module level): `icd --help` stays fast.
Several heads of one package (Diff-Prompt's stages) share one commands module.
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
from ..recipes import DataConfig, Recipe, validate


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


# `data:` keys the trainer itself reads, whatever the head.
TRAINER_DATA_KEYS = frozenset({"num_workers", "cache", "shards"})


class Head:
    """Base class of a head. Subclasses set `Options` (the schema of the recipe's `model:` section),
    `data_keys` and `pipeline_classes`, and implement `build`, `trainable`, `train_dataset`, `loss`,
    `export` and `pipeline`."""

    Options: type[BaseModel] = NoOptions
    # The recipe's `data:` keys this head reads (besides TRAINER_DATA_KEYS); a key it does not read,
    # set to anything but its default, is refused by `load_head`. None: every key is read.
    data_keys: frozenset[str] | None = None
    # The pipeline classes `export` writes (a folder's `_class_name` is one of their `__name__`s).
    pipeline_classes: tuple[type, ...] = ()
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

    def pipeline(self, model: torch.nn.Module) -> Any:
        """The inference pipeline (one of `pipeline_classes`) over the trained `model`."""
        raise NotImplementedError

    def model_card(self) -> str:
        """The body of the exported README.md."""
        return f"Trained by incontext_diffusion with the recipe `{self.recipe.name}` (see recipe.yaml).\n"


def available_heads() -> dict[str, Any]:
    """Head name -> its entry point (not loaded: loading imports the head's torch code)."""
    return {ep.name: ep for ep in entry_points(group="incontext_diffusion.heads")}


def head_class(name: str, where: str) -> type[Head]:
    heads = available_heads()
    if name not in heads:
        close = difflib.get_close_matches(name, list(heads), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown head '{name}' in {where}: {hint}available: {', '.join(sorted(heads))}")
    return heads[name].load()


def check_data_keys(head: type[Head], recipe: Recipe) -> None:
    """Refuse a `data:` key the head does not read, set to anything but its default."""
    if head.data_keys is None:
        return
    read = head.data_keys | TRAINER_DATA_KEYS
    for key, field in DataConfig.model_fields.items():
        value = getattr(recipe.data, key)
        if key not in read and value != field.default:
            raise UserError(f"data.{key}: {value} in recipe {recipe.name} is not read by the {recipe.head} head: remove it "
                            f"(this head reads data.{', data.'.join(sorted(read))})")


def load_head(recipe: Recipe) -> Head:
    """Instantiate the head a recipe names; its `data:` keys and `model:` options are checked here."""
    head = head_class(recipe.head, f"recipe {recipe.name}")
    check_data_keys(head, recipe)
    return head(recipe)


def pipeline_class(class_name: str, head_name: str | None = None) -> type:
    """The pipeline class named `class_name`, from the head named `head_name` (the recipe that made a
    folder) or, for folders made elsewhere (converted checkpoints), from any installed head."""
    others = sorted(name for name in available_heads() if name != head_name)
    for name in ([head_name] if head_name in available_heads() else []) + others:
        for cls in head_class(name, "the installed heads").pipeline_classes:
            if cls.__name__ == class_name:
                return cls
    raise UserError(f"no installed head exports a {class_name}: install the package that made the folder, or pass a folder exported by `icd train`")
