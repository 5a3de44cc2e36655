"""The `icd` command line (also `python -m incontext_diffusion`).

Every user error exits with code 2 and one line on stderr; `icd --debug ...` shows the traceback.
Each installed head's commands (infer, eval, extras) come from its commands module, found through
the entry-point group `incontext_diffusion.heads` (see core/head.py). Nothing heavy is imported at
module level here or in those modules: `icd --help`, `icd recipes` and `icd info` start at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Callable, Optional

# Before diffusers/transformers are imported: their loading bars would clutter every command.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# bitsandbytes (the 8-bit optimiser) warns at import, through diffusers, about a CPU 4-bit kernel we never use.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

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
    overwrite: bool = False  # replace existing output files (otherwise they are refused)

    def __post_init__(self) -> None:
        from .core.components import check_model_files
        from .core.images import check_output_target
        from .core.model_folder import read_model_folder

        read_model_folder(self.model)  # a broken model_index.json or recipe.yaml: one line, before anything loads
        check_model_files(self.model)  # so is a missing or broken weights file
        if self.out is not None:  # before the model loads: a bad output path fails at once
            check_output_target(self.out, overwrite=self.overwrite)

    def refuse_unused(self, uses: set[str], kind: str) -> None:
        """One line naming the first flag given that a `kind` model does not read."""
        refuse_unused(self, uses, kind, always_read=("model", "seed", "overwrite"))


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
    overwrite: bool = False  # replace an existing results.md / results.json

    def __post_init__(self) -> None:
        from .core.components import check_model_files
        from .core.images import check_output_folder
        from .core.model_folder import read_model_folder

        read_model_folder(self.model)
        check_model_files(self.model)
        check_output_folder(self.out, what="--out")  # before the evaluation runs, not after it
        written = [self.out / name for name in RESULT_FILES if (self.out / name).exists()]
        if written and not self.overwrite:
            raise UserError(f"{written[0]} already exists: pass --overwrite to replace the results, or choose another --out")

    def refuse_unused(self, uses: set[str], kind: str) -> None:
        """One line naming the first flag given that a `kind` model's evaluation does not read."""
        refuse_unused(self, uses, kind, always_read=("model", "out", "seed", "num_samples", "overwrite"))

RESULT_FILES = ("results.json", "results.md")

def refuse_unused(options: InferOptions | EvalOptions, uses: set[str], kind: str, always_read: tuple[str, ...]) -> None:
    for name, value in vars(options).items():
        if name in always_read or name in uses:
            continue
        if value not in (None, False, [], ()):
            flag = "--image" if name == "images" else "--" + name.replace("_", "-")
            raise UserError(f"{flag} is not used by a {kind} model: drop it (this model reads {', '.join(sorted(uses)) or 'no options'})")


# Pipeline class name (model_index.json's `_class_name`) -> handler(options). Each head's commands
# module adds its own (see register_head_commands below).
INFER_HANDLERS: dict[str, Callable[[InferOptions], None]] = {}
EVAL_HANDLERS: dict[str, Callable[[EvalOptions], dict]] = {}


def quiet_loading() -> None:
    """No per-component loading bars from diffusers/transformers: `icd` shows its own progress."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _handler(table: dict, model: Path, verb: str) -> Callable:
    from .core.model_folder import read_model_folder

    kind = read_model_folder(model).class_name
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (default: refuse them)."),
) -> None:
    """Run a trained model on your inputs and write the result."""
    from .core.model_folder import resolve_model

    options = InferOptions(resolve_model(model), out, prompt, example, query, [Path(i) for i in image], grid, steps, guidance, seed, num_images,
                           height, width, processing_resolution, tta, batch_size, device, dtype, overwrite)
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing results in --out (default: refuse them)."),
) -> None:
    """Evaluate a trained model; writes results.md and results.json."""
    from .core.model_folder import resolve_model

    task_list = [t for item in tasks for t in item.split(",") if t]
    try:
        scale_list = [float(s) for s in scales.split(",") if s] if scales else []
    except ValueError:
        raise UserError(f"--scales {scales!r} is not a comma-separated list of numbers: pass e.g. --scales 0.5,1.0,1.5") from None
    options = EvalOptions(resolve_model(model), out, data, task_list, num_samples, steps, guidance, seed, inception_weights,
                          protocol, scale_list, batch_size, device, dtype, overwrite)
    write_results(_handler(EVAL_HANDLERS, options.model, "eval")(options), out)


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md (a Markdown table) and the same table on the terminal."""
    def shown(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    from .core.images import write_text_atomic

    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {shown(v)} |" for k, v in results.items()]
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
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
    from .core.cache import write_cache
    from .recipes import load_recipe

    head = load_head(load_recipe(recipe, set_))
    quiet_loading()
    count = write_cache(head, out, batch_size=batch_size)
    console.print(f"cached {count} samples in {out}; train with --set data.cache={out}")


@data_app.command("shard")
def data_shard(
    recipe: str = typer.Option(..., "--recipe", "-r", help="The recipe whose training samples to write (its data.cache, when set)."),
    out: str = typer.Option(..., "--out", "-o", help="New folder or URL (s3://, gs://, ...) for the shards; then train with --set data.shards=OUT."),
    set_: list[str] = typer.Option([], "--set", help="Recipe override (backbone, data.*), as for `icd train`."),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", min=1, help="Samples per Parquet file, also the shuffle buffer (default: about 256 MiB, at most 1000)."),
) -> None:
    """Write a recipe's training samples as Parquet shards that training streams, each process its own."""
    from .core.head import load_head
    from .core.shards import write_shards
    from .recipes import load_recipe

    head = load_head(load_recipe(recipe, set_))
    quiet_loading()
    count = write_shards(head, out, samples_per_shard)
    console.print(f"wrote {count} samples to {out}; train with --set data.shards={out}")


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
    sweep: bool = typer.Option(False, "--sweep", help="Cost against image size (at --batch, default 4) and batch 1-32 (at --resolution, default the smallest size), one training case per head: sweep.{json,md,png} in --out."),
) -> None:
    """Time training steps and inference of every head: median s/iter, samples/s, FLOPs, MFU, peak memory."""
    import torch

    from .bench import CASES, DTYPES, SWEEP_BATCH, SWEEP_CASES, markdown_table, run_case, sweep_table, write_results, write_sweep

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
    if sweep:
        from .bench import sweep as run_sweep

        unknown = [name for name in cases or [] if name not in CASES]
        if unknown:
            raise UserError(f"unknown benchmark case {unknown[0]!r}: choose from {', '.join(CASES)}")
        quiet_loading()

        def report(point) -> None:
            measured = f"{point.seconds_per_step:.3f} s/step" if point.seconds_per_step is not None else point.note
            console.print(f"{point.case} {point.series} series: {point.size}px, batch {point.batch}: {measured}")

        points = run_sweep(cases or list(SWEEP_CASES), device, dtype, size, size_series_batch=batch or SWEEP_BATCH, batch_series_size=resolution,
                           iterations=iterations, warmup=warmup, overrides=tuple(set_), report=report)
        paths = write_sweep(points, out)
        typer.echo(sweep_table(points))
        console.print(f"wrote {', '.join(str(p) for p in paths)}")
        return
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
    """Print versions, devices, and whether the hub can be reached (without importing torch)."""
    from . import __version__
    from .core.hub import hub_reachable
    from .core.model_folder import ASSETS

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    backbone = ASSETS / "tiny-ldm"
    rows = {
        "incontext_diffusion": __version__,
        "python": platform.python_version(),
        **{package: installed(package) for package in ("torch", "diffusers", "transformers", "accelerate", "datasets")},
        "cuda devices (nvidia-smi)": ", ".join(nvidia_gpus()) or "none",
        "cpu threads": os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "hub reachable": str(hub_reachable()),
        "embedded backbone": f"{backbone} ({'present' if (backbone / 'model_index.json').is_file() else 'missing'})",
        "heads": ", ".join(sorted(ep.name for ep in entry_points(group="incontext_diffusion.heads"))),
    }
    table = Table("item", "value")
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def nvidia_gpus() -> list[str]:
    """GPU names from `nvidia-smi -L` (importing torch to ask would take seconds)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(UUID")[0].strip() for line in listing.splitlines() if line.startswith("GPU ")]


def register_head_commands() -> None:
    """Import each installed head's commands module and let it register its commands.

    A head's entry point names its class (`pkg.my_head.head:MyHead`); its commands module is the
    package's `commands` (`pkg.my_head.commands`), if there is one (see core/head.py).
    """
    packages = {ep.module.rpartition(".")[0] for ep in entry_points(group="incontext_diffusion.heads")}
    for module in sorted(f"{package}.commands" for package in packages if package):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the entry point's package is gone (an installed copy out of date): no commands
            found = False
        if found:
            importlib.import_module(module).register(app=app, data_app=data_app, convert_app=convert_app, infer=INFER_HANDLERS, evaluate=EVAL_HANDLERS)


register_head_commands()


def usage_error_line(error) -> str:
    """click's own usage errors (`min=`, types, missing or unknown options) as our one line."""
    message = " ".join(error.format_message().split()).rstrip(".")
    command = error.ctx.command_path if error.ctx is not None else "icd"
    return f"{message[:1].lower()}{message[1:]}: see `{command} --help`"


def main() -> None:
    """Run `icd`: a mistake the user can fix ends in one line `error: ...` and exit code 2."""
    try:  # typer >= 0.22 carries its own copy of click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    from .errors import is_user_os_error, os_error_message

    try:
        exit_code = app(standalone_mode=False)  # click's errors come back to us instead of printing a panel
    except NoArgsIsHelpError as err:  # `icd` alone, `icd data`: typer printed the help as it raised this
        sys.exit(err.exit_code)
    except (UserError, ClickException, OSError) as err:
        if DEBUG or (isinstance(err, OSError) and not is_user_os_error(err)):
            raise
        if isinstance(err, UsageError):
            line = usage_error_line(err)
        elif isinstance(err, OSError):
            line = os_error_message(err, doing="cannot use")
        elif isinstance(err, ClickException):
            line = err.format_message()
        else:
            line = str(err)
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    if isinstance(exit_code, int) and exit_code:
        sys.exit(exit_code)
