"""`icd` commands of the Prompt Diffusion head: infer, eval, `convert prompt-diffusion`, `data annotate`.

Nothing heavy is imported at module level, so `icd --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import UserError

PIPELINE = "PromptDiffusionPipeline"


def infer(options) -> None:
    """`icd infer --model DIR --example SRC TGT --query IMG --prompt TEXT --out OUT.png [--grid]`."""
    from .evaluate import load_pipeline, run_pipeline
    from ...core.images import load_rgb, make_grid, save_image

    options.out = options.out or Path("outputs/infer.png")
    if options.example is None or options.query is None:
        raise UserError("a Prompt Diffusion model needs --example SOURCE TARGET and --query IMAGE (and usually --prompt TEXT)")
    if options.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--out {options.out} must be an image file name, e.g. out.png")
    source, target, query = (load_rgb(path) for path in (*options.example, options.query))  # checked before the model loads
    pipe = load_pipeline(options.model)
    image = run_pipeline(pipe, options.prompt or "", source, target, query, steps=options.steps or 50,
                         guidance=options.guidance or 9.0, seed=options.seed, show_progress=True)
    save_image(image, options.out)
    print(f"wrote {options.out}")
    if options.grid:
        grid_path = options.out.with_name(f"{options.out.stem}_grid.png")
        labels = ["example source", "example target", "query", "output"]
        save_image(make_grid([source, target, query, image], labels=labels), grid_path)
        print(f"wrote {grid_path}")


def evaluate(options) -> dict:
    from .evaluate import evaluate_model

    return evaluate_model(options.model, options.tasks, data=options.data, num_samples=options.num_samples, steps=options.steps or 50,
                          seed=options.seed, inception_weights=options.inception_weights)


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    import typer

    infer[PIPELINE] = globals()["infer"]
    evaluate[PIPELINE] = globals()["evaluate"]

    @convert_app.command("prompt-diffusion")
    def convert_prompt_diffusion(
        checkpoint: Path = typer.Argument(..., help="The original checkpoint (e.g. network-step=04999.ckpt), ldm layout."),
        out: Path = typer.Argument(..., help="New folder: a complete PromptDiffusionPipeline (diffusers layout)."),
        config: Optional[str] = typer.Option("stable-diffusion-v1-5/stable-diffusion-v1-5", "--config",
                                             help="Diffusers folder or cached hub id giving the component configs, tokenizer and scheduler."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .ckpt that needs unpickling (runs code from the file)."),
    ) -> None:
        """Convert an original Prompt Diffusion checkpoint (ControlNet and UNet from the checkpoint itself)."""
        from .convert import convert_checkpoint

        convert_checkpoint(checkpoint, out, config=config, trust_pickle=trust_pickle)
        print(f"wrote {out}")

    @data_app.command("annotate")
    def annotate(
        source: Path = typer.Argument(..., help="Dataset folder, e.g. an InstructPix2Pix folder ({seed}_0.jpg and {seed}_1.jpg)."),
        tasks: str = typer.Option("depth,hed,seg", "--tasks", help="Comma-separated: depth, hed, seg, canny."),
        cache: Optional[Path] = typer.Option(None, "--cache", help="Where maps go (default: beside each image)."),
    ) -> None:
        """Compute condition maps for every image (both _0 and _1), cached and resumable."""
        from ...data.annotators import annotate_folder

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        root = annotate_folder(source, names, cache)
        print(f"maps for {', '.join(names)} are in {root}")
