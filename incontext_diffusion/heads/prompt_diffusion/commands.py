"""`icd` commands of the Prompt Diffusion head: infer, eval, `convert prompt-diffusion`, `data annotate`.

Nothing heavy is imported at module level, so `icd --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import UserError

PIPELINE = "PromptDiffusionPipeline"
INFER_OPTIONS = {"out", "prompt", "example", "query", "grid", "steps", "guidance", "height", "width", "device", "dtype"}
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def infer(options) -> None:
    """`icd infer --model DIR --example SRC TGT --query IMG|DIR|GLOB [--prompt TEXT] [--out OUT.png|DIR] [--grid]`.

    One output per query: `--out` is a file for one query, a folder (outputs named after the queries)
    for several. Without --height/--width the output has the query's size.
    """
    options.refuse_unused(INFER_OPTIONS, "Prompt Diffusion")
    from PIL import Image

    from ...core.images import expand_image_inputs, load_rgb, make_grid, save_image
    from .evaluate import inference_settings, load_pipeline

    if options.example is None or options.query is None:
        raise UserError("a Prompt Diffusion model needs --example SOURCE TARGET and --query IMAGE (a file, a folder or a glob; usually --prompt TEXT too)")
    query_paths = expand_image_inputs([options.query])
    out = options.out or (Path("outputs/infer.png") if len(query_paths) == 1 else Path("outputs/infer"))
    one_file = out.suffix.lower() in OUTPUT_SUFFIXES
    if one_file and len(query_paths) > 1:
        raise UserError(f"--query gives {len(query_paths)} images but --out {out} is one file: pass a folder, e.g. --out outputs/infer")
    if not one_file and out.suffix:
        raise UserError(f"--out {out} is neither an image file ({', '.join(OUTPUT_SUFFIXES)}) nor a folder: pass e.g. out.png or outputs/infer")
    source, target = (load_rgb(path) for path in options.example)  # checked before the model loads
    queries = [load_rgb(path) for path in query_paths]
    pipe = load_pipeline(options.model, options.device, options.dtype)
    pipe.set_progress_bar_config(disable=False, leave=False)
    steps, guidance = inference_settings(pipe, options.steps, options.guidance)
    for path, query in zip(query_paths, queries):
        try:
            image = pipe(options.prompt or "", query, [source, target], height=options.height, width=options.width, num_inference_steps=steps,
                         guidance_scale=guidance, generator=torch_generator(options.seed)).images[0]
        except ValueError as err:  # size and pair checks of the pipeline: the user's inputs
            raise UserError(str(err)) from None
        if options.height is None and options.width is None and image.size != query.size:
            image = image.resize(query.size, Image.Resampling.LANCZOS)  # the pipeline rounds to the latent grid
        image_path = out if one_file else out / f"{path.stem}.png"
        save_image(image, image_path, overwrite=options.overwrite)
        print(f"wrote {image_path}")
        if options.grid:
            grid_path = image_path.with_name(f"{image_path.stem}_grid.png")
            labels = ["example source", "example target", "query", "output"]
            save_image(make_grid([source, target, query, image], labels=labels), grid_path, overwrite=options.overwrite)
            print(f"wrote {grid_path}")


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def evaluate(options) -> dict:
    from .evaluate import evaluate_model

    if options.protocol is not None or options.scales:
        raise UserError("--protocol and --scales are not used by a Prompt Diffusion model: drop them")
    return evaluate_model(options.model, options.tasks, data=options.data, num_samples=options.num_samples, steps=options.steps,
                          guidance=options.guidance, seed=options.seed, inception_weights=options.inception_weights,
                          batch_size=options.batch_size, device=options.device, dtype=options.dtype, out=options.out)


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
        conditioning_range: str = typer.Option("[-1, 1]", "--conditioning-range",
                                               help="Range of the example pair and query fed to the ControlNet: [-1, 1] (the paper) or [0, 1] (diffusers' port)."),
    ) -> None:
        """Convert an original Prompt Diffusion checkpoint (ControlNet and UNet from the checkpoint itself)."""
        from .convert import convert_checkpoint

        ranges = ("[-1, 1]", "[0, 1]")
        if conditioning_range.replace(" ", "") not in [r.replace(" ", "") for r in ranges]:
            raise UserError(f"--conditioning-range {conditioning_range!r} is not known: choose '[-1, 1]' (the paper) or '[0, 1]' (diffusers' port)")
        conditioning_range = ranges[[r.replace(" ", "") for r in ranges].index(conditioning_range.replace(" ", ""))]
        convert_checkpoint(checkpoint, out, config=config, trust_pickle=trust_pickle, conditioning_range=conditioning_range)
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
