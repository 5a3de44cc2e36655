"""`icd infer` / `icd eval` for Diff-Prompt models and `icd data refcoco-check` (nothing heavy imported at module level)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...errors import UserError

DEFAULT_BATCH = 32


def _mask_picture(mask):
    from ...core.images import to_pil

    return to_pil(mask.clamp(0, 1), value_range=(0, 1))


def _inputs(options, kind: str) -> list[Path]:
    from ...core.images import expand_image_inputs

    images = expand_image_inputs(options.images)
    if not images:
        raise UserError(f"pass --image IMG (a file, a folder or a glob) and --text \"the small red cube\" for a {kind} model")
    if not options.prompt:
        raise UserError("pass the referring expression with --text \"the small red cube\"")
    return images


def _output_paths(options, images: list[Path], default_name: str) -> list[Path]:
    """One PNG per image: --out itself for a single image and a .png --out, else FOLDER/<image stem>.png."""
    if len(images) == 1 and (options.out is None or options.out.suffix.lower() == ".png"):
        return [options.out or Path("outputs") / f"{default_name}.png"]
    folder = options.out or Path("outputs") / "infer"
    if folder.suffix:
        raise UserError(f"--out {folder} is a file but {len(images)} images were given: pass a folder for --out")
    return [folder / f"{image.stem}.png" for image in images]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _pipeline(cls, options):
    pipe = cls.from_pretrained(options.model)
    if options.device:
        pipe.to(options.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def infer_grounding(options) -> None:
    """Per image: boxes with scores (JSON, in the image's pixels), a PNG with the top box, and with --grid the
    generated mask (at the image's size) and the trajectory strip."""
    import torch

    from ...core.images import load_rgb, make_grid, save_image
    from ...core.model_folder import read_model_folder
    from .head import draw_boxes
    from .pipeline import DiffPromptGroundingPipeline

    diff_prompt = read_model_folder(options.model).index.get("method") == "diff_prompt"
    options.refuse_unused({"images", "prompt", "out", "batch_size", "device"} | ({"steps", "grid"} if diff_prompt else set()), "Diff-Prompt grounding")
    images = _inputs(options, "grounding")
    outputs = _output_paths(options, images, "grounding")
    pipe = _pipeline(DiffPromptGroundingPipeline, options)
    generator = torch.Generator().manual_seed(options.seed)
    written = []
    for chunk in _chunks(list(zip(images, outputs)), options.batch_size or DEFAULT_BATCH):
        out = pipe([image for image, _ in chunk], [options.prompt] * len(chunk), generator, top_k=5, num_inference_steps=options.steps)
        for i, (image, png) in enumerate(chunk):
            boxes = [[round(v, 2) for v in box] for box in out.boxes[i].tolist()]
            result = {"text": options.prompt, "image": str(image), "boxes_xyxy": boxes, "scores": [round(v, 4) for v in out.scores[i].tolist()]}
            save_image(draw_boxes(load_rgb(image), [], boxes[:1]), png, overwrite=options.overwrite)
            png.with_suffix(".json").write_text(json.dumps(result, indent=2))
            written += [png, png.with_suffix(".json")]
            if options.grid and out.masks is not None:
                strip = make_grid([_mask_picture(m[i]) for m in out.trajectory_masks], labels=[f"layer {k}" for k in range(len(out.trajectory_masks))],
                                  ncols=len(out.trajectory_masks))
                save_image(_mask_picture(out.masks[i]), png.with_name(png.stem + "_mask.png"), overwrite=options.overwrite)
                save_image(strip, png.with_name(png.stem + "_trajectory.png"), overwrite=options.overwrite)
                written += [png.with_name(png.stem + "_mask.png"), png.with_name(png.stem + "_trajectory.png")]
            if len(images) == 1:
                print(json.dumps(result, indent=2))
    print(f"wrote {len(written)} files: " + ", ".join(str(p) for p in written[:6]) + (" ..." if len(written) > 6 else ""))


def infer_mask(options) -> None:
    """Stage 2, per image: the generated mask at the image's size and the DDIM trajectory strip."""
    import torch

    from ...core.images import make_grid, save_image
    from .pipeline import DiffPromptMaskPipeline

    options.refuse_unused({"images", "prompt", "out", "steps", "batch_size", "device"}, "Diff-Prompt mask generation")
    images = _inputs(options, "mask generation")
    outputs = _output_paths(options, images, "mask")
    pipe = _pipeline(DiffPromptMaskPipeline, options)
    steps = options.steps or pipe.config.ddim_steps
    generator = torch.Generator().manual_seed(options.seed)
    shown = list(range(0, steps, max(steps // 8, 1)))[:8] + [steps - 1]
    written = []
    for chunk in _chunks(list(zip(images, outputs)), options.batch_size or DEFAULT_BATCH):
        out = pipe([image for image, _ in chunk], [options.prompt] * len(chunk), steps, generator, output_type="pil")
        for i, (_, png) in enumerate(chunk):
            save_image(out.masks[i], png, overwrite=options.overwrite)
            decoded = [pipe.mask_vae.decode(out.trajectory[k][i:i + 1]).sample[0] for k in shown]
            save_image(make_grid([_mask_picture(m) for m in decoded], labels=[f"step {k + 1}" for k in shown], ncols=len(shown)), png.with_name(png.stem + "_trajectory.png"), overwrite=options.overwrite)
            written += [png, png.with_name(png.stem + "_trajectory.png")]
    print(f"wrote {len(written)} files: " + ", ".join(str(p) for p in written[:6]) + (" ..." if len(written) > 6 else ""))


def eval_samples_size(pipe) -> int:
    """The side the held-out samples are rendered at: the host's input (grounding) or the mask size (stage 2)."""
    return pipe.host.image_size if hasattr(pipe, "host") else pipe.mask_size


def _eval_splits(options, size: int):
    from ...data.refcoco import REFCOCO_SPLITS, SYNTHETIC_SPLITS, load_refexp

    if options.data is None:  # held-out synthetic scenes
        splits = options.tasks or list(SYNTHETIC_SPLITS)
        return {s: load_refexp("synthscenes", None, s, size, options.num_samples, 1_000_000) for s in splits}
    splits = options.tasks or [s for s in REFCOCO_SPLITS if s != "train"]
    return {s: load_refexp("refcoco", str(options.data), s, size) for s in splits}


def _batches(samples, batch_size: int):
    from .head import _as_batch

    for start in range(0, len(samples), batch_size):
        yield _as_batch([samples[i] for i in range(start, min(start + batch_size, len(samples)))])


def _meter(pipe, options):
    from ...metrics.speed import SpeedMeter

    return SpeedMeter(pipe.device, pipe.dtype, options.batch_size or DEFAULT_BATCH)


def eval_grounding(options) -> dict:
    """R@1 / R@5 / UB (GIoU >= 0.5, official) and the same with IoU, per split; DDIM steps default to the exported ddim_steps.
    A Diff-Prompt model also scores the IoU of the mask its DiT generated (the stage-2 figure of a folder holding all stages)."""
    import torch

    from ...metrics.grounding import GroundingRecall, mask_iou
    from .pipeline import DiffPromptGroundingPipeline

    pipe = _pipeline(DiffPromptGroundingPipeline, options)
    meter = _meter(pipe, options)
    generator = torch.Generator().manual_seed(options.seed)
    results: dict = {"method": pipe.prompts.method, "ddim_steps": options.steps or pipe.config.ddim_steps}
    for split, samples in _eval_splits(options, eval_samples_size(pipe)).items():
        metric, ious = GroundingRecall(), []
        for batch in _batches(samples, options.batch_size or DEFAULT_BATCH):
            with meter.timed(len(batch["texts"])):
                out = pipe(batch["images"], batch["texts"], generator, top_k=None, num_inference_steps=options.steps)
            size = batch["images"].shape[-1]
            for boxes, scores, gt in zip(out.boxes, out.scores, batch["boxes"]):
                metric.update(boxes / size, gt, scores)  # pixels -> normalised, like the ground truth
            if out.masks is not None and batch["masks"] is not None:  # RefCOCO samples without a mask score boxes only
                ious += [mask_iou(m.cpu(), g) for m, g in zip(out.masks, batch["masks"])]
        results.update({f"{split} {k}": v for k, v in metric.compute().items()} | {f"{split} expressions": len(samples)})
        if ious:
            results[f"{split} mask IoU"] = sum(ious) / len(ious)
    return results | meter.results()


def eval_mask_generation(options) -> dict:
    """IoU of the decoded, thresholded generated masks with the ground truth, per split; DDIM steps default to the exported ddim_steps."""
    import torch

    from ...metrics.grounding import mask_iou
    from .pipeline import DiffPromptMaskPipeline

    pipe = _pipeline(DiffPromptMaskPipeline, options)
    meter = _meter(pipe, options)
    generator = torch.Generator().manual_seed(options.seed)
    steps = options.steps or pipe.config.ddim_steps
    results: dict = {"ddim_steps": steps}
    for split, samples in _eval_splits(options, eval_samples_size(pipe)).items():
        ious = []
        for batch in _batches(samples, options.batch_size or DEFAULT_BATCH):
            with meter.timed(len(batch["texts"])):
                masks = pipe(batch["images"], batch["texts"], steps, generator).masks
            ious += [mask_iou(m.cpu(), g) for m, g in zip(masks, batch["masks"])]
        results.update({f"{split} mask IoU": sum(ious) / max(len(ious), 1), f"{split} expressions": len(ious)})
    return results | meter.results()


def eval_mask_vae(options) -> dict:
    """Reconstruction IoU of the Mask-VAE (posterior mean, threshold 0.5) on held-out masks."""
    from diffusers import AutoencoderKL

    from ...core.model_folder import read_model_folder
    from ...metrics.grounding import mask_iou
    from ...metrics.speed import SpeedMeter
    from .mask_vae import reconstruct

    folder = read_model_folder(options.model)
    vae = AutoencoderKL.from_pretrained(str(folder.path / "mask_vae")).eval()
    if options.device:
        vae.to(options.device)
    meter = SpeedMeter(vae.device, vae.dtype, options.batch_size or DEFAULT_BATCH)
    results: dict = {}
    for split, samples in _eval_splits(options, folder.index.get("mask_size", 224)).items():
        ious = []
        for batch in _batches(samples, options.batch_size or DEFAULT_BATCH):
            with meter.timed(len(batch["masks"])):
                reconstructions = reconstruct(vae, batch["masks"].to(vae.device)).cpu()
            ious += [mask_iou(r, g) for r, g in zip(reconstructions, batch["masks"])]
        results.update({f"{split} reconstruction IoU": sum(ious) / max(len(ious), 1), f"{split} masks": len(ious)})
    return results | meter.results()


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    import typer

    infer["DiffPromptGroundingPipeline"] = infer_grounding  # the host alone and the host with prompts
    infer["DiffPromptMaskPipeline"] = infer_mask
    evaluate["DiffPromptGroundingPipeline"] = eval_grounding
    evaluate["DiffPromptMaskPipeline"] = eval_mask_generation
    evaluate["DiffPromptMaskVAE"] = eval_mask_vae

    @convert_app.command("diff-prompt-mask-vae")
    def convert_mask_vae_command(
        source: Path = typer.Argument(..., help="The released Mask-VAE: the oaaoaa/mask_vae folder, or the Lightning epoch=157-step=13113.ckpt."),
        out: Path = typer.Argument(..., help="New stage-1 folder (mask_vae/, model_index.json)."),
        mask_size: int = typer.Option(224, "--mask-size", help="Side of the masks it was trained on (224 for the released one)."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .ckpt that needs unpickling (runs code from the file)."),
    ) -> None:
        """Convert the released Diff-Prompt Mask-VAE into a stage-1 model folder."""
        from .convert import convert_mask_vae, write_mask_vae_folder

        print(f"wrote {write_mask_vae_folder(convert_mask_vae(source, trust_pickle), out, mask_size)}")

    @convert_app.command("diff-prompt-dit")
    def convert_dit_command(
        source: Path = typer.Argument(..., help="The released DiT: the oaaoaa/mask_dit folder, or a DiT-main checkpoint such as 0094200.pt (EMA weights taken)."),
        out: Path = typer.Argument(..., help="New stage-2 folder (mask_vae/ dit/ clip/ scheduler/)."),
        mask_vae: Path = typer.Option(..., "--mask-vae", help="A stage-1 folder, e.g. the output of icd convert diff-prompt-mask-vae."),
        clip: str = typer.Option("openai/clip-vit-base-patch32", "--clip", help="CLIP hub id or folder (projection width = the DiT's)."),
        schedule: str = typer.Option("cosine", "--schedule", help="cosine (the official samplers) or linear (the official train.py)."),
        num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads, if the checkpoint has no config.json (DiT-My/2: 8)."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a .pt that needs unpickling (the official train.py saves argparse args in it)."),
    ) -> None:
        """Convert the released Diff-Prompt DiT into a stage-2 model folder."""
        from .convert import convert_dit, write_dit_folder

        if schedule not in ("cosine", "linear"):
            raise UserError(f"--schedule {schedule!r} is unknown: choose cosine or linear")
        print(f"wrote {write_dit_folder(convert_dit(source, trust_pickle, num_heads), mask_vae, clip, out, schedule)}")

    @app.command("diff-prompt-diagnose")
    def diff_prompt_diagnose(
        model: Path = typer.Option(..., "--model", help="A Diff-Prompt stage-3 model folder (method diff_prompt)."),
        num_samples: int = typer.Option(100, "--num-samples", help="Held-out synthetic scenes (from seed 1,000,000)."),
        seed: int = typer.Option(0, "--seed"),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the table as JSON here."),
    ) -> None:
        """Where the gain is lost: host alone, the DiT's prompts, oracle prompts (true masks), and the DiT's mask as a box."""
        from .diagnose import diagnose

        table = diagnose(model, num_samples, seed)
        for row, values in table.items():
            print(f"{row:34s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items() if "R@" in k and "_iou" not in k))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table, indent=2))
            print(f"wrote {out}")

    @data_app.command("refcoco-check")
    def refcoco_check(
        path: Path = typer.Argument(..., help="Folder with finetune_refcoco_<split>.json and train2014/, or parquet file(s), or refs(unc).p."),
        split: str = typer.Option("val", "--split"),
        trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling refs(unc).p (runs code from the file)."),
    ) -> None:
        """Read a RefCOCO copy and print how many expressions it holds (checks paths and formats)."""
        from ...data.refcoco import load_refexp, load_refs_pickle

        if path.suffix == ".p":
            print(f"{len(load_refs_pickle(path, trust_pickle))} refs in {path}")
            return
        samples = load_refexp("refcoco", str(path), split, 224)
        first = samples[0] if len(samples) else None
        print(f"{len(samples)} expressions in split {split}" + (f"; first: {first.text!r} box {first.box}" if first else ""))
