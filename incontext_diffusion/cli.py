"""The `icd` command line (also `python -m incontext_diffusion`).

Every user error exits with code 2 and one line on stderr; `icd --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Make and prepare datasets (synthetic scenes, annotations).")
convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints into diffusers-format model folders.")
app.add_typer(data_app, name="data")
app.add_typer(convert_app, name="convert")
console = Console()
err_console = Console(stderr=True)
DEBUG = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of user errors too.")) -> None:
    global DEBUG
    DEBUG = debug


# ----------------------------------------------------------------------------------------- train
@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe name (see `icd recipes`) or path to a YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.max_steps=10 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint folder of this run."),
) -> None:
    """Train a model as a recipe says; writes RUN_DIR/model (diffusers layout)."""
    from .core.head import load_head
    from .core.trainer import train as run_training
    from .recipes import load_recipe

    head = load_head(load_recipe(recipe, set_))
    out = run_training(head, resume=resume)
    console.print(f"model written to {out}")


# ----------------------------------------------------------------------------------------- infer
def _pipeline_class(model: Path) -> str:
    index = model / "model_index.json"
    if not index.is_file():
        raise UserError(f"{model} is not an exported model folder (no model_index.json): pass RUN_DIR/model of a training run")
    return json.loads(index.read_text())["_class_name"]


@app.command()
def infer(
    model: Path = typer.Option(..., "--model", "-m", help="An exported model folder (e.g. assets/tiny-ldm or runs/NAME/model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text prompt."),
    out: Path = typer.Option(Path("outputs/infer.png"), "--out", "-o", help="Output PNG."),
    steps: int = typer.Option(25, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(4.0, "--guidance", min=1.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_images: int = typer.Option(1, "--num-images", min=1, help="Images to generate (a grid when > 1)."),
) -> None:
    """Run a trained model on your inputs and write the result."""
    kind = _pipeline_class(model)
    if kind == "StableDiffusionPipeline":
        from .heads.tiny_ldm import text_to_image

        if not prompt:
            raise UserError("a text-to-image model needs --prompt TEXT")
        text_to_image(model, prompt, out, steps=steps, guidance=guidance, seed=seed, num_images=num_images)
    else:
        raise UserError(f"{model} holds a {kind}, which `icd infer` does not know: use a model exported by `icd train`")
    console.print(f"wrote {out}")


# ------------------------------------------------------------------------------------------ eval
@app.command(name="eval")
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="An exported model folder."),
    out: Path = typer.Option(Path("outputs/eval"), "--out", "-o", help="Folder for the Markdown and JSON tables."),
    num_samples: int = typer.Option(64, "--num-samples", "-n", min=1, help="Samples to evaluate."),
    steps: int = typer.Option(25, "--steps", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Evaluate a trained model; writes results.md and results.json."""
    kind = _pipeline_class(model)
    if kind != "StableDiffusionPipeline":
        raise UserError(f"{model} holds a {kind}, which `icd eval` does not know yet")
    from .heads.tiny_ldm import evaluate_text_to_image

    results = evaluate_text_to_image(model, num_samples=num_samples, steps=steps, seed=seed)
    write_results(results, out)


def write_results(results: dict[str, float], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    table = Table("metric", "value")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


# ------------------------------------------------------------------------------------------ data
@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the dataset."),
    n: int = typer.Option(100, "--n", help="Number of scenes."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="First scene seed."),
    min_objects: int = typer.Option(1, "--min-objects"),
    max_objects: int = typer.Option(3, "--max-objects"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG grid of the first scenes and their maps."),
) -> None:
    """Render synthetic scenes into an imagefolder dataset (metadata.jsonl; loads with `datasets`)."""
    from .data.synthscenes import write_dataset

    folder = write_dataset(out, n=n, size=size, seed=seed, min_objects=min_objects, max_objects=max_objects)
    console.print(f"wrote {n} scenes to {folder}")
    if grid is not None:
        from .data.synthscenes import scene_grid

        scene_grid(seeds=range(seed, seed + min(n, 4)), size=size, path=grid)
        console.print(f"wrote {grid}")


# --------------------------------------------------------------------------------------- convert
@convert_app.command("single-file")
def convert_single_file(
    checkpoint: Path = typer.Argument(..., help="A single-file SD checkpoint (.safetensors or .ckpt)."),
    out: Path = typer.Argument(..., help="New diffusers-format folder."),
    config: Optional[str] = typer.Option(None, "--config", help="Diffusers folder or hub id with the component configs."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .ckpt that needs unpickling (runs code from the file)."),
) -> None:
    """Convert a single-file Stable Diffusion checkpoint into a diffusers folder."""
    from .core.components import load_components, save_components

    components = load_components(str(checkpoint), config=config, trust_pickle=trust_pickle)
    save_components(components, out)
    console.print(f"wrote {out}")


# --------------------------------------------------------------------------------- recipes, info
@app.command()
def recipes() -> None:
    """List the recipes with a one-line description each."""
    from .recipes import list_recipes

    table = Table("recipe", "description")
    for name, description in list_recipes():
        table.add_row(name, description)
    console.print(table)


@app.command()
def info() -> None:
    """Print versions, devices, and whether the hub can be reached."""
    import accelerate
    import datasets
    import diffusers
    import torch
    import transformers

    from . import __version__
    from .core.components import TINY_LDM, hub_reachable

    table = Table("item", "value")
    rows = {
        "incontext_diffusion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "cuda devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "mps": str(torch.backends.mps.is_available()),
        "cpu threads": str(torch.get_num_threads()),
        "hub reachable": str(hub_reachable()),
        "embedded backbone": f"{TINY_LDM} ({'present' if (TINY_LDM / 'model_index.json').is_file() else 'missing'})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def main() -> None:
    try:
        app()
    except UserError as err:
        if DEBUG:
            raise
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
