"""`icd infer`, `icd eval` and `icd convert meta-prompts` for MetaPrompts models.

Nothing heavy is imported at module level: `icd --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError

DEPTH, SEGMENTATION = "MetaPromptsDepthPipeline", "MetaPromptsSegmentationPipeline"


def input_images(paths: list[Path]) -> list[Path]:
    """--image files and folders -> image files (folders expanded, sorted by name)."""
    from ...core.images import list_images

    if not paths:
        raise UserError("a MetaPrompts model needs input images: pass --image FILE (repeatable) or --image FOLDER")
    files: list[Path] = []
    for path in paths:
        files += list_images(path) if Path(path).is_dir() else [Path(path)]
    return files


def infer_images(options) -> None:
    """Per image: depth as 16-bit PNG (mm) + coloured PNG + .npy, or labels PNG + overlay PNG."""
    import numpy as np
    from rich.progress import track

    from ...core.images import load_rgb, save_depth_png, save_image
    from .pipeline import MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline

    files = input_images(options.images)
    kind = json.loads((options.model / "model_index.json").read_text())["_class_name"]
    pipe = (MetaPromptsDepthPipeline if kind == DEPTH else MetaPromptsSegmentationPipeline).from_pretrained(options.model)
    out = Path(options.out or "outputs/infer")
    if out.suffix:
        raise UserError(f"--out {out} looks like a file: MetaPrompts writes several files per image, pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path in track(files, description=f"predicting {len(files)} image(s)"):
        try:
            image = load_rgb(path)
        except UserError as err:
            print(f"skipped: {err}")
            failed.append(path.name)
            continue
        prediction = pipe(image).prediction[0]
        if kind == DEPTH:
            depth = prediction[..., 0]
            save_depth_png(out / f"{path.stem}_depth.png", depth, scale=1000.0)  # millimetres
            save_image(pipe.visualize_depth(depth)[0], out / f"{path.stem}_depth_colored.png")
            np.save(out / f"{path.stem}_depth.npy", depth.astype(np.float32))
        else:
            from PIL import Image

            save_image(Image.fromarray(prediction.astype(np.uint8)), out / f"{path.stem}_labels.png")
            save_image(pipe.overlay(image, prediction), out / f"{path.stem}_overlay.png")
    print(f"wrote {len(files) - len(failed)} prediction(s) to {out}")
    if failed:
        raise UserError(f"{len(failed)} of {len(files)} input(s) could not be read ({', '.join(failed)}): the others were written")


def _dataset_for(options, task: str):
    """The evaluation set: --data (split file for NYU/KITTI, dataset folder for ADE20K/Cityscapes) or held-out synthetic scenes."""
    from ...data import perception

    recipe_file = options.model / "recipe.yaml"
    scenes = {"size": 64, "min_objects": 1, "max_objects": 3}  # synthetic scenes like the training ones
    if recipe_file.is_file():
        import yaml

        data_section = yaml.safe_load(recipe_file.read_text()).get("data", {})
        scenes = {key: data_section.get(key, value) for key, value in scenes.items()}
    source = options.tasks[0] if options.tasks else None
    data = options.data
    if data is None or source == "synthscenes":
        from .head import HELD_OUT_SEED

        kind = perception.SynthDepth if task == "depth" else perception.SynthSegmentation
        return kind(options.num_samples, seed=HELD_OUT_SEED + options.seed, **scenes), "synthscenes"
    data = Path(data)
    if source is None:  # guess from the layout
        if (data / "ADEChallengeData2016").is_dir() or (data / "images" / "validation").is_dir():
            source = "ade20k"
        elif (data / "leftImg8bit").is_dir():
            source = "cityscapes"
        elif data.suffix == ".txt":
            source = "nyu" if task == "depth" else None
        if source is None:
            raise UserError(f"cannot tell which dataset {data} is: add --tasks nyu|kitti|ade20k|cityscapes|synthscenes")
    readers = {"nyu": perception.NYUv2Depth, "kitti": perception.KITTIDepth, "ade20k": perception.ADE20K, "cityscapes": perception.Cityscapes}
    if source not in readers:
        raise UserError(f"unknown evaluation dataset '{source}': use nyu, kitti, ade20k, cityscapes or synthscenes")
    return readers[source](data), source


def evaluate_model(options) -> dict:
    """Every depth metric (per image, then averaged) or mIoU/aAcc over the evaluation set."""
    from rich.progress import track

    from ...metrics import DepthMetrics, SegmentationMetrics
    from .pipeline import MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline

    kind = json.loads((options.model / "model_index.json").read_text())["_class_name"]
    task = "depth" if kind == DEPTH else "segmentation"
    dataset, source = _dataset_for(options, task)
    pipe = (MetaPromptsDepthPipeline if task == "depth" else MetaPromptsSegmentationPipeline).from_pretrained(options.model)
    count = min(options.num_samples, len(dataset))
    if task == "depth":
        crop = {"nyu": "nyu_eigen", "kitti": "kitti_garg"}.get(source)
        metrics = DepthMetrics(min_depth=1e-3, max_depth=pipe.head.config.max_depth, crop=crop)
    else:
        metrics = SegmentationMetrics(num_classes=pipe.head.config.num_classes)
    for i in track(range(count), description=f"evaluating {count} {source} samples"):
        sample = dataset[i]
        image = (sample["image"][None] + 1) / 2
        prediction = pipe(image, output_type="pt").prediction.cpu()
        if task == "depth":
            metrics.update(prediction[:, 0], sample["depth"])
        else:
            metrics.update(prediction, sample["labels"][None])
    results = metrics.compute()
    if task == "segmentation":  # per-class IoU shows which classes are confused (NaN: class absent)
        names = getattr(dataset, "class_names", None) or [str(c) for c in range(metrics.num_classes)]
        results.update({f"IoU_{name}": iou for name, iou in zip(names, metrics.per_class_iou())})
    return {**results, "dataset": source, "num_samples": count}


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    import typer

    for kind in (DEPTH, SEGMENTATION):
        infer[kind] = infer_images
        evaluate[kind] = evaluate_model

    @convert_app.command("meta-prompts")
    def convert_meta_prompts(
        checkpoint: Path = typer.Argument(..., help="An official MetaPrompts checkpoint (.pth/.ckpt with ldm names, or .safetensors)."),
        out: Path = typer.Argument(..., help="New model folder (what `icd infer` loads)."),
        task: str = typer.Option("depth", "--task", help="depth or segmentation."),
        backbone: str = typer.Option("stable-diffusion-v1-5/stable-diffusion-v1-5", "--backbone", help="Diffusers folder or hub id giving the VAE/UNet configs."),
        max_depth: float = typer.Option(10.0, "--max-depth", help="Depth: 10 (NYU) or 80 (KITTI)."),
        resize_scale: int = typer.Option(1, "--resize-scale", help="Depth: 1 (NYU) or 2 (KITTI)."),
        num_classes: int = typer.Option(150, "--num-classes", help="Segmentation: 150 (ADE20K) or 19 (Cityscapes)."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that needs unpickling (runs code from the file)."),
    ) -> None:
        """Convert an official MetaPrompts checkpoint (fudan-zvg/meta-prompts) into a model folder."""
        from .convert import convert_checkpoint

        convert_checkpoint(checkpoint, out, task=task, backbone=backbone, max_depth=max_depth, resize_scale=resize_scale,
                           num_classes=num_classes, trust_pickle=trust_pickle)
        print(f"wrote {out}")
