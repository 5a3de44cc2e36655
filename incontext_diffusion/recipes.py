"""Recipes (how a model is trained) and task cards (what is learned), loaded from YAML and validated.

A recipe is found by name in `recipes/` (the project's own, then `./recipes` of the working
directory) or given as a path. `--set a.b=c` overrides any key; the value is parsed as YAML, so
`--set train.max_steps=10` gives an int. Validation errors are one line naming the key: an unknown
key comes with the closest valid one, a wrong type with the expected type.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def search_dirs(kind: str) -> list[Path]:
    """Folders searched for recipes or task cards: the project's own first, then the working dir's."""
    dirs = [PROJECT_ROOT / kind, Path.cwd() / kind]
    unique: list[Path] = []
    for folder in dirs:
        if folder.is_dir() and folder.resolve() not in [d.resolve() for d in unique]:
            unique.append(folder)
    return unique


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where training and evaluation samples come from."""

    source: Literal["synthscenes", "imagefolder", "ip2p", "nyu", "kitti", "ade20k", "cityscapes", "refcoco"] = "synthscenes"
    path: str | None = None  # dataset folder for real sources
    size: int = Field(64, ge=16)  # training resolution (square)
    num_samples: int = Field(10_000, ge=1)  # synthetic scenes: how many distinct seeds
    seed: int = 0  # synthetic scenes: first seed; held-out scenes use seeds above the training ones
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1)
    held_out: int = Field(100, ge=0)  # scenes kept for validation and evaluation
    num_workers: int = Field(0, ge=0)
    cache: str | None = None  # a folder written by `icd data cache`: precomputed encoder outputs to train from
    shards: str | None = None  # a folder or URL (s3://, gs://) written by `icd data shard`: streamed, each process its own shards


class TrainConfig(Strict):
    """Optimisation, precision and bookkeeping of the shared trainer."""

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast; trained weights stay fp32
    gradient_checkpointing: bool = False
    # Fast paths, each checked against the default path in tests/test_fast_paths.py.
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = "adamw"  # adamw_8bit needs bitsandbytes
    allow_tf32: bool = False  # TF32 matmuls and convolutions (Ampere and newer GPUs)
    channels_last: bool = False  # NHWC memory format for the diffusers models
    attention: Literal["sdpa", "eager"] = "sdpa"  # sdpa: PyTorch's fused kernels (flash / memory-efficient)
    compile: bool = False  # torch.compile the diffusers models (UNet, ControlNet, VAE, DiT) in place
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    compile_backend: str = "inductor"  # torch.compile's backend; "aot_eager" traces without generating kernels
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    validate_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    on_nan: Literal["stop", "skip"] = "stop"


class Recipe(Strict):
    """A validated training recipe. `model` is checked by the head's own options class."""

    name: str = ""
    description: str
    head: str
    backbone: str | None = "tiny"
    tasks: list[str] = []
    seed: int = 0
    output_dir: str | None = None  # default: runs/<recipe name>
    data: DataConfig = DataConfig()
    model: dict[str, Any] = {}
    train: TrainConfig = TrainConfig()

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


class TaskCard(Strict):
    """What one task learns: modalities, annotators, fixed text (see tasks/*.yaml)."""

    name: str
    description: str
    source: str  # modality of the query / input, e.g. "image", "depth", "hed", "seg", "canny"
    target: str
    annotator: dict[str, str] = {}  # modality -> annotator name (data/annotators.py), for each modality but "image"
    text: str | None = None  # fixed text of forward (image -> map) tasks; None: the image caption


# ----------------------------------------------------------------------------- validation errors


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for key, field in model.model_fields.items():
        keys.append(prefix + key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, prefix + key + "."))
    return keys


def _type_word(error: dict) -> str:
    kind = error["type"]
    if kind.startswith(("int_", "float_", "bool_", "string_")) or kind in ("int_type", "float_type"):
        return {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}[kind.split("_")[0]]
    return error["msg"].lower()


def validation_message(err: ValidationError, model: type[BaseModel], where: str, prefix: str = "") -> str:
    """Turn pydantic's first error into one line naming the key and the fix."""
    error = err.errors()[0]
    key = prefix + ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, [prefix + k for k in _all_keys(model)], n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else "see the recipe reference in the README"
        return f"unknown key '{key}' in {where}: {hint}"
    if error["type"] == "missing":
        return f"missing key '{key}' in {where}: add it"
    if error["type"] == "literal_error":
        return f"'{key}' in {where} {error['msg'].lower()} (got {error.get('input')!r})"
    return f"'{key}' in {where} must be {_type_word(error)} (got {error.get('input')!r})"


def validate(model: type[BaseModel], data: dict, where: str, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(validation_message(err, model, where, prefix)) from None


# ----------------------------------------------------------------------------- loading


def _available(kind: str) -> list[str]:
    return sorted({p.stem for folder in search_dirs(kind) for p in folder.glob("*.yaml")})


def _find(kind: str, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{kind[:-1]} file '{path}' does not exist: check the path")
        return path
    for folder in search_dirs(kind):
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    available = _available(kind)
    close = difflib.get_close_matches(name_or_path, available, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"{kind[:-1]} '{name_or_path}' not found: {hint}available: {', '.join(available) or 'none'}")


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a YAML mapping (key: value lines)")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides in place; the value is parsed as YAML (`10` -> int, `[a, b]` -> list)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set '{item}' needs the form key=value, e.g. --set train.max_steps=10")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe (the head's `model:` options are checked by the head)."""
    path = _find("recipes", name_or_path)
    data = apply_overrides(read_yaml(path), overrides or [])
    data.setdefault("name", path.stem)
    return validate(Recipe, data, f"recipe {path.stem}")


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe found."""
    rows = []
    for name in _available("recipes"):
        path = _find("recipes", name)
        try:
            rows.append((name, str(read_yaml(path).get("description", "")).strip().splitlines()[0]))
        except (UserError, IndexError):
            rows.append((name, "(unreadable)"))
    return rows


def load_task(name_or_path: str) -> TaskCard:
    """Load and validate a task card; each modality's annotator must be a registered one that draws it."""
    from .data.annotators import annotator_for  # the registry a card's annotator names refer to

    path = _find("tasks", name_or_path)
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    card = validate(TaskCard, data, f"task card {path.stem}")
    for modality in dict.fromkeys((card.source, card.target)):
        if modality == "image":
            continue
        if modality not in card.annotator:
            raise UserError(f"task card {path.stem} names no annotator for {modality}: add `annotator: {{{modality}: NAME}}`")
        try:
            annotator_for(modality, card.annotator[modality])
        except UserError as err:
            raise UserError(f"task card {path.stem}: {err}") from None
    return card


def list_tasks() -> list[str]:
    return _available("tasks")
