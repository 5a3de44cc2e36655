"""The one reader of an exported model folder: `model_index.json` and the recipe that trained it.

`icd infer`, `icd eval`, the app and `load_pipeline` all read a folder through `read_model_folder`,
so a broken or foreign folder gets the same one-line error everywhere, and recipe settings come
back validated (with the recipe schema's defaults) instead of as raw YAML. `load_pipeline` gives
any exported folder (or shipped model name) as the pipeline class its `_class_name` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..recipes import Recipe, validate

# The embedded model zoo: `--model tiny-meta-prompts-depth` names assets/tiny-meta-prompts-depth.
ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"


def shipped_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model_index.json").is_file()) if ASSETS.is_dir() else []


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder path, or the short name of a shipped model under assets/."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) > 1:
        return path
    if (ASSETS / path.name / "model_index.json").is_file():
        return ASSETS / path.name
    raise UserError(f"model '{name_or_path}' is neither a folder nor a shipped model: pass RUN_DIR/model or one of {', '.join(shipped_models()) or '(none shipped)'}")


@dataclass
class ModelFolder:
    """What an exported folder says about itself."""

    path: Path
    class_name: str  # model_index.json's `_class_name`: which pipeline loads the folder
    index: dict  # the whole model_index.json (pipeline config: components and inference defaults)
    recipe: Recipe | None  # the recipe that trained it (recipe.yaml); None for folders made elsewhere


def read_model_folder(path: str | Path) -> ModelFolder:
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path} is not an exported model folder (no model_index.json): pass RUN_DIR/model of a training run or a folder under assets/")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{index_file} is not valid JSON ({err}): re-export the model or restore the file") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise UserError(f"{index_file} names no pipeline class (`_class_name`): re-export the model or restore the file")
    recipe = None
    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        try:
            data = yaml.safe_load(recipe_file.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{recipe_file} is not valid YAML ({str(err).splitlines()[0]}): re-export the model or restore the file") from None
        recipe = validate(Recipe, data or {}, str(recipe_file))
    return ModelFolder(path, index["_class_name"], index, recipe)


def load_pipeline(name_or_path: str | Path, **kwargs: Any) -> Any:
    """The pipeline of an exported folder or a shipped model (`tiny-ldm`), as the class its
    model_index.json names, found through the head that made it; `kwargs` go to `from_pretrained`."""
    from .head import pipeline_class

    folder = read_model_folder(resolve_model(name_or_path))
    cls = pipeline_class(folder.class_name, folder.recipe.head if folder.recipe else None)
    return cls.from_pretrained(str(folder.path), **kwargs)
