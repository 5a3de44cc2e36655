"""`icd infer` / `icd eval` for Diff-Prompt models and `icd data refcoco-check` (nothing heavy imported at module level)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...errors import UserError

DEFAULT_EVAL_SCENES = 100


def draw_boxes(rgb, gt_boxes, pred_boxes):
    """An RGB image (uint8 array) with normalised xyxy boxes: ground truth green, predictions red."""
    from PIL import ImageDraw

    from ...core.images import load_rgb

    image = load_rgb(rgb)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for boxes, colour in ((gt_boxes, (0, 200, 0)), (pred_boxes, (230, 30, 30))):
        for x1, y1, x2, y2 in boxes:
            draw.rectangle([x1 * w, y1 * h, max(x2 * w - 1, x1 * w), max(y2 * h - 1, y1 * h)], outline=colour)
    return image


def _mask_picture(mask):
    from ...core.images import to_pil

    return to_pil(mask.clamp(0, 1), value_range=(0, 1))


def _load_image(path: Path, size: int):
    import numpy as np

    from ...core.images import load_rgb
    from .head import image_tensor

    rgb = np.asarray(load_rgb(path))
    return rgb, image_tensor(np.asarray(load_rgb(path, size=size)))[None]


def _only_image(options) -> Path:
    if len(options.images) != 1:
        raise UserError("pass exactly one --image IMG (and --text \"the small red cube\")")
    if not options.prompt:
        raise UserError("pass the referring expression with --text \"the small red cube\"")
    return options.images[0]


def _model_size(model: Path, default: int = 64) -> int:
    index = json.loads((model / "model_index.json").read_text())
    return index.get("image_size") or index.get("mask_size") or default


def infer_grounding(options) -> None:
    """Boxes with scores as JSON, a PNG with the top box, and with --grid the generated mask and trajectory strip."""
    import torch

    from ...core.images import make_grid, save_image
    from .pipeline import GroundingPipeline

    options.out = options.out or Path("outputs/infer.png")
    image_path = _only_image(options)
    pipe = GroundingPipeline.from_pretrained(options.model)
    size = pipe.host.preprocess(torch.zeros(1, 3, 8, 8)).shape[-1]
    rgb, image = _load_image(image_path, size)
    out = pipe(image, [options.prompt], torch.Generator().manual_seed(options.seed), top_k=5)
    h, w = rgb.shape[:2]
    boxes = [[round(v, 2) for v in (b[0] * w, b[1] * h, b[2] * w, b[3] * h)] for b in out.boxes[0].tolist()]
    result = {"text": options.prompt, "image": str(image_path), "boxes_xyxy": boxes, "scores": [round(s, 4) for s in out.scores[0].tolist()]}
    png = options.out if options.out.suffix.lower() == ".png" else options.out / "grounding.png"
    save_image(draw_boxes(rgb, [], out.boxes[0, :1].tolist()), png)
    png.with_suffix(".json").write_text(json.dumps(result, indent=2))
    written = [png, png.with_suffix(".json")]
    if out.masks is not None and options.grid:
        save_image(_mask_picture(out.masks[0]), png.with_name(png.stem + "_mask.png"))
        strip = make_grid([_mask_picture(m[0]) for m in out.trajectory_masks], labels=[f"layer {i}" for i in range(len(out.trajectory_masks))], ncols=len(out.trajectory_masks))
        save_image(strip, png.with_name(png.stem + "_trajectory.png"))
        written += [png.with_name(png.stem + "_mask.png"), png.with_name(png.stem + "_trajectory.png")]
    print(json.dumps(result, indent=2))
    print("wrote " + ", ".join(str(p) for p in written))


def infer_mask(options) -> None:
    """Stage 2: the generated mask and the DDIM trajectory strip for an image and an expression."""
    import torch

    from ...core.images import make_grid, save_image
    from .pipeline import MaskGenerationPipeline

    options.out = options.out or Path("outputs/infer.png")
    image_path = _only_image(options)
    pipe = MaskGenerationPipeline.from_pretrained(options.model)
    _, image = _load_image(image_path, _model_size(options.model))
    steps = options.steps or 25
    out = pipe(image, [options.prompt], steps, torch.Generator().manual_seed(options.seed))
    png = options.out if options.out.suffix.lower() == ".png" else options.out / "mask.png"
    save_image(_mask_picture(out.masks[0]), png)
    shown = list(range(0, steps, max(steps // 8, 1)))[:8] + [steps - 1]
    strip = make_grid([_mask_picture(pipe.mask_vae.decode(out.trajectory[i]).sample[0]) for i in shown], labels=[f"step {i + 1}" for i in shown], ncols=len(shown))
    save_image(strip, png.with_name(png.stem + "_trajectory.png"))
    print(f"wrote {png} and {png.with_name(png.stem + '_trajectory.png')}")


def _eval_splits(options, size: int):
    from ...data.refcoco import REFCOCO_SPLITS, SYNTHETIC_SPLITS, load_refexp

    if options.data is None:  # held-out synthetic scenes
        splits = options.tasks or list(SYNTHETIC_SPLITS)
        return {s: load_refexp("synthscenes", None, s, size, options.num_samples, 1_000_000) for s in splits}
    splits = options.tasks or [s for s in REFCOCO_SPLITS if s != "train"]
    return {s: load_refexp("refcoco", str(options.data), s, size) for s in splits}


def _batches(samples, batch_size: int = 32):
    from .head import _as_batch

    for start in range(0, len(samples), batch_size):
        yield _as_batch([samples[i] for i in range(start, min(start + batch_size, len(samples)))])


def eval_grounding(options) -> dict:
    """R@1 / R@5 / UB (GIoU >= 0.5, official) and the same with IoU, per split."""
    import torch

    from ...metrics.grounding import GroundingRecall
    from .pipeline import GroundingPipeline

    pipe = GroundingPipeline.from_pretrained(options.model)
    size = pipe.host.preprocess(torch.zeros(1, 3, 8, 8)).shape[-1]
    generator = torch.Generator().manual_seed(options.seed)
    results: dict = {"method": pipe.prompts.method}
    for split, samples in _eval_splits(options, size).items():
        metric = GroundingRecall()
        for batch in _batches(samples):
            out = pipe(batch["images"], batch["texts"], generator, top_k=None)
            for boxes, scores, gt in zip(out.boxes, out.scores, batch["boxes"]):
                metric.update(boxes, gt, scores)
        results.update({f"{split} {k}": v for k, v in metric.compute().items()} | {f"{split} expressions": len(samples)})
    return results


def eval_mask_generation(options) -> dict:
    """IoU of the decoded, thresholded generated masks with the ground truth, per split."""
    import torch

    from ...metrics.grounding import mask_iou
    from .pipeline import MaskGenerationPipeline

    pipe = MaskGenerationPipeline.from_pretrained(options.model)
    generator = torch.Generator().manual_seed(options.seed)
    results: dict = {}
    for split, samples in _eval_splits(options, _model_size(options.model)).items():
        ious = []
        for batch in _batches(samples):
            masks = pipe(batch["images"], batch["texts"], options.steps or 25, generator).masks
            ious += [mask_iou(m, g) for m, g in zip(masks, batch["masks"])]
        results.update({f"{split} mask IoU": sum(ious) / max(len(ious), 1), f"{split} expressions": len(ious)})
    return results


def eval_mask_vae(options) -> dict:
    """Reconstruction IoU of the Mask-VAE (posterior mean, threshold 0.5) on held-out masks."""
    from diffusers import AutoencoderKL

    from ...metrics.grounding import mask_iou
    from .mask_vae import reconstruct

    vae = AutoencoderKL.from_pretrained(str(options.model / "mask_vae")).eval()
    results: dict = {}
    for split, samples in _eval_splits(options, _model_size(options.model)).items():
        ious = []
        for batch in _batches(samples):
            ious += [mask_iou(r, g) for r, g in zip(reconstruct(vae, batch["masks"]), batch["masks"])]
        results.update({f"{split} reconstruction IoU": sum(ious) / max(len(ious), 1), f"{split} masks": len(ious)})
    return results


def register(app, data_app, convert_app, infer: dict, evaluate: dict) -> None:
    import typer

    infer["DiffPromptGroundingPipeline"] = infer_grounding
    infer["GroundingHostPipeline"] = infer_grounding
    infer["DiffPromptMaskPipeline"] = infer_mask
    evaluate["DiffPromptGroundingPipeline"] = eval_grounding
    evaluate["GroundingHostPipeline"] = eval_grounding
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
