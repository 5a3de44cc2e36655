"""The `icd` command line (also `python -m incontext_diffusion`).

Every user error exits with code 2 and one line on stderr; `icd --debug ...` shows the traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Before diffusers/transformers are imported: their loading bars would clutter every command.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# bitsandbytes (the 8-bit optimiser) warns at import, through diffusers, about a CPU 4-bit kernel we never use.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table

from .errors import UserError  # noqa: E402

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
    quiet_loading()
    out = run_training(head, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, rank 0 speaks for the run
        console.print(f"model written to {out}")


# ----------------------------------------------------------------------------------- infer, eval
@dataclass
class InferOptions:
    """Everything `icd infer` accepts; each model kind uses what it needs and names what is missing.

    None (or empty / False) means "not given": the model's exported defaults apply. A handler calls
    `refuse_unused(uses, kind)` first, so a flag its model does not read is refused, never ignored.
    """

    model: Path
    out: Path | None = None  # None: the handler's default (outputs/infer.png or outputs/infer/)
    prompt: str | None = None
    example: tuple[Path, Path] | None = None
    query: Path | None = None
    images: list[Path] = field(default_factory=list)  # files, folders or globs: core.images.expand_image_inputs
    grid: bool = False
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num_images: int | None = None
    height: int | None = None
    width: int | None = None
    processing_resolution: int | None = None
    tta: bool | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None

    def refuse_unused(self, uses: set[str], kind: str) -> None:
        """One line naming the first flag given that a `kind` model does not read."""
        for name, value in vars(self).items():
            if name in ("model", "seed") or name in uses:
                continue
            if value not in (None, False, [], ()):
                flag = "--image" if name == "images" else "--" + name.replace("_", "-")
                raise UserError(f"{flag} is not used by a {kind} model: drop it (this model reads {', '.join(sorted(uses)) or 'no options'})")


@dataclass
class EvalOptions:
    """Everything `icd eval` accepts; None means the model's exported defaults."""

    model: Path
    out: Path
    data: Path | None = None
    tasks: list[str] = field(default_factory=list)
    num_samples: int = 100
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    inception_weights: Path | None = None
    protocol: str | None = None  # paper | fast (Meta-Prompts: the official TTA, or one pass)
    scales: list[float] = field(default_factory=list)  # multi-scale test (segmentation)
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None


# Pipeline class name (model_index.json's `_class_name`) -> handler(options). Heads add theirs in
# their `commands.py` (see HEAD_COMMANDS below).
INFER_HANDLERS: dict[str, Callable[[InferOptions], None]] = {}
EVAL_HANDLERS: dict[str, Callable[[EvalOptions], dict]] = {}


def quiet_loading() -> None:
    """No per-component loading bars from diffusers/transformers: `icd` shows its own progress."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _pipeline_class(model: Path) -> str:
    index = model / "model_index.json"
    if not index.is_file():
        raise UserError(f"{model} is not an exported model folder (no model_index.json): pass RUN_DIR/model of a training run")
    return json.loads(index.read_text())["_class_name"]


def _handler(table: dict, model: Path, verb: str) -> Callable:
    kind = _pipeline_class(model)
    quiet_loading()
    if kind not in table:
        raise UserError(f"{model} holds a {kind}, which `icd {verb}` does not know: models it knows: {', '.join(sorted(table))}")
    return table[kind]


@app.command()
def infer(
    model: str = typer.Option(..., "--model", "-m", help="An exported model folder (runs/NAME/model) or a shipped model's name (e.g. tiny-ldm)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (PNG) or folder (default: outputs/infer.png, or outputs/infer/ for several inputs)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "--text", "-p", help="Text prompt or referring expression."),
    example: Optional[tuple[Path, Path]] = typer.Option(None, "--example", help="In-context example pair: SOURCE TARGET."),
    query: Optional[Path] = typer.Option(None, "--query", help="In-context query image."),
    image: list[str] = typer.Option([], "--image", "-i", help="Input image: a file, a folder or a glob (repeatable)."),
    grid: bool = typer.Option(False, "--grid", help="Also write a panel of the inputs and the output."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=1.0, help="Classifier-free guidance scale (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_images: Optional[int] = typer.Option(None, "--num-images", min=1, help="Images to generate (a grid when > 1)."),
    height: Optional[int] = typer.Option(None, "--height", min=8, help="Output height (default: the model's, or the query's)."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Output width (default: the model's, or the query's)."),
    processing_resolution: Optional[int] = typer.Option(None, "--processing-resolution", min=8, help="Side the model sees (default: its training size); outputs come back at the input's size."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Test-time augmentation (default: the model's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Inputs per pipeline call."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: CUDA when present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: fp32)."),
) -> None:
    """Run a trained model on your inputs and write the result."""
    from .core.model_folder import resolve_model

    options = InferOptions(resolve_model(model), out, prompt, example, query, [Path(i) for i in image], grid, steps, guidance, seed, num_images,
                           height, width, processing_resolution, tta, batch_size, device, dtype)
    _handler(INFER_HANDLERS, options.model, "infer")(options)


@app.command(name="eval")
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="An exported model folder or a shipped model's name."),
    out: Path = typer.Option(Path("outputs/eval"), "--out", "-o", help="Folder for results.md and results.json."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data folder (default: held-out synthetic scenes)."),
    tasks: list[str] = typer.Option([], "--tasks", help="Tasks to evaluate (comma-separated or repeated)."),
    num_samples: int = typer.Option(100, "--num-samples", "-n", min=1, help="Samples to evaluate."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=1.0, help="Guidance scale (default: the model's)."),
    seed: int = typer.Option(0, "--seed"),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception weights for FID."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="paper (the official test-time augmentation) or fast (one pass); default per dataset."),
    scales: Optional[str] = typer.Option(None, "--scales", help="Multi-scale test, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (segmentation)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per pipeline call."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: CUDA when present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: fp32)."),
) -> None:
    """Evaluate a trained model; writes results.md and results.json."""
    from .core.model_folder import resolve_model

    task_list = [t for item in tasks for t in item.split(",") if t]
    try:
        scale_list = [float(s) for s in scales.split(",") if s] if scales else []
    except ValueError:
        raise UserError(f"--scales {scales!r} is not a comma-separated list of numbers: pass e.g. --scales 0.5,1.0,1.5") from None
    options = EvalOptions(resolve_model(model), out, data, task_list, num_samples, steps, guidance, seed, inception_weights,
                          protocol, scale_list, batch_size, device, dtype)
    write_results(_handler(EVAL_HANDLERS, options.model, "eval")(options), out)


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md (a Markdown table) and the same table on the terminal."""
    def shown(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {shown(v)} |" for k, v in results.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    table = Table("metric", "value")
    for key, value in results.items():
        table.add_row(key, shown(value))
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


@data_app.command("cache")
def data_cache(
    recipe: str = typer.Option(..., "--recipe", "-r", help="The recipe whose training data to encode."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the cache; then train with --set data.cache=OUT."),
    set_: list[str] = typer.Option([], "--set", help="Recipe override (backbone, data.*), as for `icd train`."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples encoded at once."),
) -> None:
    """Precompute the frozen encoders' outputs (VAE latents, text embeddings) of a recipe's training set."""
    from .core.head import load_head
    from .data.cache import write_cache
    from .recipes import load_recipe

    head = load_head(load_recipe(recipe, set_))
    quiet_loading()
    count = write_cache(head, out, batch_size=batch_size)
    console.print(f"cached {count} samples in {out}; train with --set data.cache={out}")


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


# ------------------------------------------------------------------------------------------- app
@app.command(name="app")
def app_command(
    model_dir: list[str] = typer.Option([], "--model-dir", help="An exported model folder or a shipped model's name (repeatable; default: the shipped models)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 opens the app to your network."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to serve on."),
    share: bool = typer.Option(False, "--share", help="Also open a public gradio.live link (off unless asked)."),
) -> None:
    """A browser app: in-context generation, depth and segmentation, grounding, text-to-image."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the app needs Gradio: pip install 'incontext_diffusion[app]'")
    from .app import launch

    quiet_loading()
    launch(model_dir, host=host, port=port, share=share)


# --------------------------------------------------------------------------------- recipes, info
@app.command()
def bench(
    cases: list[str] = typer.Argument(None, help="Cases to run (default: every case that fits --size); see `icd bench --list`."),
    size: str = typer.Option("tiny", "--size", help="tiny: the recipes' own models; sd15: SD1.5's architecture with random weights (GPU)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (training: autocast with fp32 weights; inference: half weights)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: per case)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size (default: the recipe's; sd15: per case)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps of inference cases (default: per case)."),
    iterations: int = typer.Option(10, "--iterations", "-n", help="Timed iterations (the median is reported)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed iterations first (compilation, allocator, caches)."),
    set_: list[str] = typer.Option([], "--set", help="Recipe override for every case, e.g. --set train.compile=true."),
    peak: Optional[float] = typer.Option(None, "--peak-tflops", help="Device peak for MFU (default: known GPUs' dense bf16 peak)."),
    out: Path = typer.Option(Path("outputs/bench"), "--out", help="Folder of bench.json (appended) and bench.md."),
    list_cases: bool = typer.Option(False, "--list", help="List the cases and exit."),
) -> None:
    """Time training steps and inference of every head: median s/iter, samples/s, FLOPs, MFU, peak memory."""
    import torch

    from .bench import CASES, DTYPES, markdown_table, run_case, write_results

    if list_cases:
        for name, case in CASES.items():
            sd15 = f"; --size sd15: recipe {case.sd15_recipe} at {case.resolution} px" if case.sd15_recipe else "; tiny only"
            console.print(f"{name}: recipe {case.recipe}, batch {case.batch}{sd15}")
        return
    if size not in ("tiny", "sd15"):
        raise UserError(f"--size {size!r} is not known: choose tiny or sd15")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not known: choose {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here: pass --device cpu")
    names = cases or [name for name, case in CASES.items() if size == "tiny" or case.sd15_recipe]
    quiet_loading()
    records = []
    for name in names:
        console.print(f"[bold]{name}[/bold] ...")
        records.append(run_case(name, size, device, dtype, batch, resolution, steps, iterations, warmup, tuple(set_), peak))
    json_path, md_path = write_results(records, out)
    typer.echo(markdown_table(records))
    console.print(f"appended to {json_path}; table of every run in {md_path}")


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


# Each built-in head registers its commands (convert, data annotate, ...) and its infer/eval
# handlers here. A commands module imports nothing heavy at module level: `icd --help` stays fast.
HEAD_COMMANDS = (
    "incontext_diffusion.heads.tiny_ldm_commands",
    "incontext_diffusion.heads.prompt_diffusion.commands",
    "incontext_diffusion.heads.meta_prompts.commands",
    "incontext_diffusion.heads.diff_prompt.commands",
)
for _module in HEAD_COMMANDS:
    if importlib.util.find_spec(_module.rsplit(".", 1)[0]) and importlib.util.find_spec(_module):
        importlib.import_module(_module).register(app=app, data_app=data_app, convert_app=convert_app, infer=INFER_HANDLERS, evaluate=EVAL_HANDLERS)


def main() -> None:
    try:
        app()
    except UserError as err:
        if DEBUG:
            raise
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
