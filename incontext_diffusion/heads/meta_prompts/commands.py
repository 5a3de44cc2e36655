"""`icd infer`, `icd eval` and `icd convert meta-prompts` for MetaPrompts models.

Nothing heavy is imported at module level: `icd --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError

DEPTH, SEGMENTATION = "MetaPromptsDepthPipeline", "MetaPromptsSegmentationPipeline"
PAPER_DATASETS = ("nyu", "kitti", "ade20k", "cityscapes")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_pipeline(folder, device: str | None, dtype: str | None):
    """The folder's depth or segmentation pipeline on `device` (default: CUDA when present) in `dtype`."""
    import torch

    from .pipeline import MetaPromptsDepthPipeline, MetaPromptsSegmentationPipeline

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not known: choose {', '.join(DTYPES)}")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here: pass --device cpu")
    kind = MetaPromptsDepthPipeline if folder.class_name == DEPTH else MetaPromptsSegmentationPipeline
    pipe = kind.from_pretrained(str(folder.path), dtype=getattr(torch, DTYPES[dtype or "fp32"]))
    pipe.set_progress_bar_config(disable=True)  # the commands show one bar over the images
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def call_settings(pipe, tta: bool | None, processing_resolution: int | None, batch_size: int | None) -> dict:
    """The pipeline arguments of `icd infer` and `icd eval` alike: a flag given, else the model's exported default."""
    return {
        "tta": pipe.config.default_tta if tta is None else tta,
        "processing_resolution": pipe.config.default_processing_resolution if processing_resolution is None else processing_resolution,
        "batch_size": batch_size or 1,
    }


def infer_images(options) -> None:
    """Per image: depth as 16-bit PNG (mm) + coloured PNG + .npy, or labels PNG + overlay PNG."""
    import numpy as np
    from PIL import Image
    from rich.progress import track

    from ...core.images import expand_image_inputs, load_rgb, save_depth_png, save_image
    from ...core.model_folder import read_model_folder

    folder = read_model_folder(options.model)
    is_depth = folder.class_name == DEPTH
    options.refuse_unused({"out", "images", "processing_resolution", "tta", "batch_size", "device", "dtype"},
                          "Meta-Prompts depth" if is_depth else "Meta-Prompts segmentation")
    if not options.images:
        raise UserError("a MetaPrompts model needs input images: pass --image FILE, FOLDER or GLOB (repeatable)")
    files = expand_image_inputs(options.images)
    out = Path(options.out or "outputs/infer")
    if out.suffix:
        raise UserError(f"--out {out} looks like a file: MetaPrompts writes several files per image, pass a folder")
    pipe = load_pipeline(folder, options.device, options.dtype)
    settings = call_settings(pipe, options.tta, options.processing_resolution, options.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for path in track(files, description=f"predicting {len(files)} image(s)"):
        try:
            image = load_rgb(path)
        except UserError as err:
            print(f"skipped: {err}")
            failed.append(path.name)
            continue
        prediction = pipe(image, **settings).prediction[0]
        if is_depth:
            depth = prediction[..., 0]
            save_depth_png(out / f"{path.stem}_depth.png", depth, scale=1000.0, overwrite=options.overwrite)  # millimetres
            colours = pipe.image_processor.visualize_depth(depth, 0.0, pipe.head.config.max_depth)[0]
            save_image(colours, out / f"{path.stem}_depth_colored.png", overwrite=options.overwrite)
            np.save(out / f"{path.stem}_depth.npy", depth.astype(np.float32))
        else:
            save_image(Image.fromarray(prediction.astype(np.uint8)), out / f"{path.stem}_labels.png", overwrite=options.overwrite)
            save_image(pipe.image_processor.overlay_segmentation(image, prediction), out / f"{path.stem}_overlay.png", overwrite=options.overwrite)
    print(f"wrote {len(files) - len(failed)} prediction(s) to {out}")
    if failed:
        raise UserError(f"{len(failed)} of {len(files)} input(s) could not be read ({', '.join(failed)}): the others were written")


def _dataset_for(options, folder, task: str):
    """The evaluation set: --data (split file for NYU/KITTI, dataset folder for ADE20K/Cityscapes) or held-out synthetic scenes."""
    from ...data import perception

    source = options.tasks[0] if options.tasks else None
    data = options.data
    if data is None or source == "synthscenes":
        from .head import HELD_OUT_SEED

        scenes = {"size": 64, "min_objects": 1, "max_objects": 3}  # synthetic scenes like the training ones
        if folder.recipe is not None:
            scenes = {key: getattr(folder.recipe.data, key) for key in scenes}
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
    """Every depth metric (per image, then averaged) or mIoU/aAcc over the evaluation set, by the
    paper's protocol (the official TTA) or one pass, with the pipeline's speed beside them."""
    from rich.progress import track

    from ...core.model_folder import read_model_folder
    from ...metrics import DepthMetrics, SegmentationMetrics
    from ...metrics.speed import SpeedMeter
    from .pipeline import DATASET_SETTINGS

    folder = read_model_folder(options.model)
    task = "depth" if folder.class_name == DEPTH else "segmentation"
    for flag, value in (("--steps", options.steps), ("--guidance", options.guidance), ("--inception-weights", options.inception_weights)):
        if value is not None:
            raise UserError(f"{flag} is not used by a Meta-Prompts {task} model: drop it")
    if options.protocol not in (None, "paper", "fast"):
        raise UserError(f"--protocol {options.protocol!r} is not known: choose paper (the official test-time augmentation) or fast (one pass)")
    if options.scales and task == "depth":
        raise UserError("--scales is a multi-scale segmentation test: drop it for a depth model")
    dataset, source = _dataset_for(options, folder, task)
    official = DATASET_SETTINGS.get(source, {})
    if official and official["task"] != task:
        raise UserError(f"{source} is a {official['task']} dataset and the model predicts {task}: pass a {task} dataset")
    pipe = load_pipeline(folder, options.device, options.dtype)
    # paper on the paper datasets; on synthetic scenes the model's own default (the tiny models: fast)
    protocol = options.protocol or ("paper" if official or pipe.config.default_tta else "fast")
    paper = protocol == "paper"
    settings = call_settings(pipe, paper, None, options.batch_size)
    if paper and official:  # the paper's protocol on its dataset: the official test size and windows
        settings["processing_resolution"] = official["processing_resolution"]
    if task == "depth":
        if paper and "shift_windows" in official:
            settings["shift_windows"] = official["shift_windows"]
        crop = {"nyu": "nyu_eigen", "kitti": "kitti_garg"}.get(source)
        # No clamp: the official metrics only replace inf/NaN predictions (meta_prompts.md §3.1).
        metrics = DepthMetrics(min_depth=1e-3, max_depth=pipe.head.config.max_depth, crop=crop, clamp=False)
    else:
        if paper and "window" in official:
            settings.update(window=official["window"], stride=official["stride"])
        if options.scales:
            settings["scales"] = options.scales
        metrics = SegmentationMetrics(num_classes=pipe.head.config.num_classes)
    meter = SpeedMeter(pipe.device, pipe.unet.dtype, settings["batch_size"])
    count = min(options.num_samples, len(dataset))
    for i in track(range(count), description=f"evaluating {count} {source} samples ({protocol} protocol)"):
        sample = dataset[i]
        image = (sample["image"][None] + 1) / 2
        with meter.timed(1):
            prediction = pipe(image, output_type="pt", **settings).prediction.cpu()
        if task == "depth":
            metrics.update(prediction[:, 0], sample["depth"])
        else:
            metrics.update(prediction, sample["labels"][None])
    results = metrics.compute()
    if task == "segmentation":  # per-class IoU shows which classes are confused (NaN: class absent)
        names = getattr(dataset, "class_names", None) or [str(c) for c in range(metrics.num_classes)]
        results.update({f"IoU_{name}": iou for name, iou in zip(names, metrics.per_class_iou())})
    ran = ", ".join(f"{key}={value}" for key, value in settings.items() if key != "batch_size")
    return {**results, "dataset": source, "num_samples": count, "protocol": protocol, "settings": ran, **meter.results()}


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    import typer

    for kind in (DEPTH, SEGMENTATION):
        infer[kind] = infer_images
        evaluate[kind] = evaluate_model

    @convert_app.command("meta-prompts")
    def convert_meta_prompts(
        checkpoint: Path = typer.Argument(..., help="An official MetaPrompts checkpoint (.pth/.ckpt with ldm names, or .safetensors)."),
        out: Path = typer.Argument(..., help="New model folder (what `icd infer` loads)."),
        dataset: str = typer.Option(..., "--dataset", help="nyu, kitti, ade20k or cityscapes: the task, max depth, resize scale, classes and test settings it was trained for."),
        backbone: str = typer.Option("stable-diffusion-v1-5/stable-diffusion-v1-5", "--backbone", help="Diffusers folder or hub id giving the VAE/UNet configs."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that needs unpickling (runs code from the file)."),
    ) -> None:
        """Convert an official MetaPrompts checkpoint (fudan-zvg/meta-prompts) into a model folder."""
        from .convert import convert_checkpoint

        convert_checkpoint(checkpoint, out, dataset=dataset, backbone=backbone, trust_pickle=trust_pickle)
        print(f"wrote {out}")
