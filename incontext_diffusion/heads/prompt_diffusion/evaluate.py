"""Inference settings and evaluation of an exported Prompt Diffusion model.

On held-out synthetic scene families (seeds from 1,000,000; the example scene and the query scene
hold the same objects, moved) every task card is scored with the in-context metrics of
`metrics/in_context.py`:
- `TASK/task_following`: the share of outputs nearest (RMSE) to the query's ground truth for the
  task, among its ground truths for every task (image, depth, HED, seg) and the query itself; the
  confusion matrix `confusion/TASK/MODALITY` (and `confusion_matrix.png`) says what they were nearest to;
- `TASK/query_following`: with the same example pair, the outputs for the query and for the next
  family's query are each nearer their own ground truth;
- quality: `TASK/rmse`, `psnr`, `ssim` against the ground truth; forward tasks (image -> map) beside
  the baselines of copying the example's target (`rmse_copy_example`), the mean ground-truth map of
  the held-out set (`rmse_constant_mean`) and the untrained head (`rmse_untrained`: a fresh ControlNet
  on the recipe's backbone); inverse tasks with `object_colour_agreement` (objects whose mean output
  colour in their true mask is their own colour) and FID with `--inception-weights`;
- unseen tasks (never trained): `TASK/placement_iou` of the output's non-background pixels with the
  query's object mask.
`in_context.png` shows one query scene under the eight example pairs. On an InstructPix2Pix folder
(`--data`) only the quality scores apply (RMSE on pixels / 255, the paper's protocol; FID).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.progress import Progress

from ...core.images import load_rgb, make_grid, save_image
from ...core.model_folder import read_model_folder
from ...data.annotators import synthetic_map
from ...data.synthscenes import scene_family
from ...errors import UserError
from ...metrics.generation import FID, GenerationMetrics, pixel_rmse
from ...metrics.in_context import (
    closest,
    confusion_matrix,
    follows_query,
    follows_task,
    mask_iou,
    non_background_mask,
    object_colour_agreement,
)
from ...metrics.speed import SpeedMeter
from ...recipes import TaskCard, load_task
from .data import HELD_OUT_SEED, triplet_from_scenes
from .pipeline import PromptDiffusionPipeline

TRAINED_TASKS = ["image_to_depth", "image_to_hed", "image_to_seg", "depth_to_image", "hed_to_image", "seg_to_image"]
UNSEEN_TASKS = ["canny_to_image", "normal_to_image"]
TARGET_MODALITIES = ["image", "depth", "hed", "seg"]  # the ground truths of the eight tasks
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICTURE_CELL = 192  # px: cells of the pictures, upscaled nearest-neighbour from the model's size


def load_pipeline(model_dir: Path, device: str | None = None, dtype: str | None = None) -> PromptDiffusionPipeline:
    """The exported pipeline on `device` (default: CUDA when present) in `dtype` (fp32, bf16, fp16)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not known: choose {', '.join(DTYPES)}")
    folder = read_model_folder(model_dir)
    if folder.class_name != PromptDiffusionPipeline.__name__:
        raise UserError(f"{model_dir} holds a {folder.class_name}, not a {PromptDiffusionPipeline.__name__}")
    try:
        pipe = PromptDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir} could not be loaded as a Prompt Diffusion model: {str(err).splitlines()[0]}") from None
    try:
        pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"), DTYPES[dtype or "fp32"])
    except RuntimeError as err:
        raise UserError(f"--device {device}: {str(err).splitlines()[0]}: pass --device cpu, or a device this machine has") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inference_settings(pipe: PromptDiffusionPipeline, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """(steps, guidance): the flags when given, else the defaults in the exported pipeline's config."""
    return steps or pipe.config.default_num_inference_steps, guidance or pipe.config.default_guidance_scale


def task_cards(names: list[str], texts: dict[str, str]) -> list[TaskCard]:
    """The task cards with the fixed texts the model was trained with (the pipeline's `task_texts`)."""
    cards = [load_task(name) for name in names]
    return [card.model_copy(update={"text": texts[card.name]}) if card.name in texts else card for card in cards]


def generate(pipe: PromptDiffusionPipeline, prompts: list[str], queries: list[np.ndarray], pairs: list[list[np.ndarray]], seeds: list[int],
             steps: int, guidance: float, batch_size: int, meter: SpeedMeter, progress: Progress, label: str) -> list[np.ndarray]:
    """One HxWx3 uint8 output per query, `batch_size` queries per call; output i is drawn with seed `seeds[i]`."""
    outputs = []
    bar = progress.add_task(label, total=len(queries))
    for start in range(0, len(queries), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        with meter.timed(len(generators)):
            images = pipe(prompts[chunk], queries[chunk], pairs[chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generators, output_type="np").images
        outputs += [np.round(image * 255).astype(np.uint8) for image in images]
        progress.advance(bar, len(generators))
    progress.remove_task(bar)
    return outputs


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays -> a (B, 3, H, W) uint8 tensor, what metrics.generation reads."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def untrained_pipeline(pipe: PromptDiffusionPipeline, backbone: str | None) -> PromptDiffusionPipeline | None:
    """The recipe's backbone with a fresh (zero-initialised) ControlNet; None when the backbone cannot be loaded here."""
    from ...core.components import load_components
    from .controlnet import PromptDiffusionControlNetModel
    from .head import make_pipeline

    try:
        components = load_components(backbone or "tiny")
    except (UserError, OSError):
        return None
    controlnet = PromptDiffusionControlNetModel.from_unet(
        components.unet, conditioning_embedding_out_channels=tuple(pipe.controlnet.config.conditioning_embedding_out_channels))
    config = pipe.config
    fresh = make_pipeline(components, controlnet, config.conditioning_range, config.default_num_inference_steps, config.default_guidance_scale, config.task_texts)
    return fresh.to(pipe.device, pipe.unet.dtype)


def evaluate_model(model_dir: Path, tasks: list[str], data: Path | None = None, num_samples: int = 100, steps: int | None = None,
                   guidance: float | None = None, seed: int = 0, inception_weights: Path | None = None, batch_size: int | None = None,
                   device: str | None = None, dtype: str | None = None, out: Path | None = None) -> dict:
    """Scores per task (see the module docstring), as a flat dict for results.md / results.json; the
    pictures go to `out` when given."""
    folder = read_model_folder(model_dir)
    pipe = load_pipeline(model_dir, device, dtype)
    steps, guidance = inference_settings(pipe, steps, guidance)
    cards = task_cards(tasks or (TRAINED_TASKS + UNSEEN_TASKS if data is None else TRAINED_TASKS), pipe.config.task_texts)
    size = folder.recipe.data.size if folder.recipe is not None else 64
    batch_size = batch_size or 8
    meter = SpeedMeter(pipe.device, pipe.unet.dtype, batch_size)
    results: dict = {"num_samples": num_samples, "steps": steps, "guidance_scale": guidance, "data": str(data or "synthetic scene families (held out, moved objects)")}
    inverse = [card for card in cards if card.target == "image"]
    if inverse and inception_weights is None:
        print("FID is skipped: pass --inception-weights PATH (a local torch-fidelity Inception file); the other scores are still computed")
    with Progress(transient=True) as progress:
        if data is None:
            results |= in_context_scores(pipe, folder, cards, num_samples, size, steps, guidance, seed, batch_size, meter, progress, inception_weights, out)
        else:
            results |= folder_scores(pipe, cards, data, num_samples, size, steps, guidance, seed, batch_size, meter, progress, inception_weights)
    return results | meter.results()


def quality_scores(name: str, generated: list[np.ndarray], reference: list[np.ndarray], inception_weights: Path | None, inverse: bool) -> dict:
    """RMSE, PSNR and SSIM against the references; FID for inverse tasks when the Inception weights are given."""
    metrics = GenerationMetrics()
    metrics.update(as_batch(generated), as_batch(reference))
    scores = {f"{name}/{key}": value for key, value in metrics.compute().items()}
    if inverse and inception_weights is not None:
        fid = FID(feature_extractor_weights_path=inception_weights)
        fid.update(as_batch(reference), real=True)
        fid.update(as_batch(generated), real=False)
        scores[f"{name}/fid"] = fid.compute()
    return scores


def folder_scores(pipe, cards, data: Path, num_samples: int, size: int, steps: int, guidance: float, seed: int, batch_size: int,
                  meter: SpeedMeter, progress: Progress, inception_weights: Path | None) -> dict:
    """Quality scores on the test split of an InstructPix2Pix folder."""
    from ...data.ip2p import IP2PTriplets

    results = {}
    for card in cards:
        triplets = IP2PTriplets(data, [card], split="test", size=size)
        triplets = [triplets[i] for i in range(min(num_samples, len(triplets)))]
        if not triplets:
            raise UserError(f"{data} has no test triplets for {card.name}: annotate it first (icd data annotate)")
        generated = generate(pipe, [t["caption"] for t in triplets], [t["query"] for t in triplets],
                             [[t["example_source"], t["example_target"]] for t in triplets], [seed + i for i in range(len(triplets))],
                             steps, guidance, batch_size, meter, progress, card.name)
        reference = [t["target"] for t in triplets]
        results |= quality_scores(card.name, generated, reference, inception_weights, card.target == "image")
        if card.target != "image":
            results[f"{card.name}/rmse_copy_example"] = pixel_rmse(as_batch([t["example_target"] for t in triplets]), as_batch(reference))
    return results


def in_context_scores(pipe, folder, cards: list[TaskCard], n: int, size: int, steps: int, guidance: float, seed: int, batch_size: int,
                      meter: SpeedMeter, progress: Progress, inception_weights: Path | None, out: Path | None) -> dict:
    """The in-context metrics on n held-out scene families (the module docstring)."""
    if n < 2:
        raise UserError("query following swaps the queries of two scene families: pass --num-samples 2 or more")
    families = [scene_family(HELD_OUT_SEED + i, 2, size, "layout") for i in range(n)]
    partner = [(i + 1) % n for i in range(n)]  # the query swapped in for family i
    seeds = [seed + i for i in range(n)]
    forward = any(card.target != "image" for card in cards)
    untrained = untrained_pipeline(pipe, folder.recipe.backbone if folder.recipe else None) if forward else None
    results, nearest_rows, nearest_columns, picture_rows = {}, [], [], []
    for card in cards:
        triplets = [triplet_from_scenes(example, query, card) for example, query in families]
        captions, queries = [t["caption"] for t in triplets], [t["query"] for t in triplets]
        pairs = [[t["example_source"], t["example_target"]] for t in triplets]
        truths = [t["target"] for t in triplets]
        outputs = generate(pipe, captions, queries, pairs, seeds, steps, guidance, batch_size, meter, progress, card.name)
        swapped = generate(pipe, [captions[j] for j in partner], [queries[j] for j in partner], pairs, seeds, steps, guidance,
                           batch_size, meter, progress, f"{card.name} (queries swapped)")

        follows = []
        for (_, query), output in zip(families, outputs):
            candidates = {m: synthetic_map(query, m) for m in dict.fromkeys([*TARGET_MODALITIES, card.source])}
            follows.append(follows_task(output, card.target, candidates))
            nearest_rows.append(card.name)
            nearest_columns.append(closest(output, candidates))
        results[f"{card.name}/task_following"] = float(np.mean(follows))
        results[f"{card.name}/query_following"] = float(np.mean(
            [follows_query(outputs[i], swapped[i], truths[i], truths[partner[i]]) for i in range(n)]))
        results |= quality_scores(card.name, outputs, truths, inception_weights, card.target == "image")
        if card.target != "image":
            constant = np.round(np.mean(truths, axis=0)).astype(np.uint8)  # the mean map of the held-out set
            results[f"{card.name}/rmse_copy_example"] = pixel_rmse(as_batch([t["example_target"] for t in triplets]), as_batch(truths))
            results[f"{card.name}/rmse_constant_mean"] = pixel_rmse(as_batch([constant] * n), as_batch(truths))
            if untrained is None:
                results[f"{card.name}/rmse_untrained"] = "skipped (the recipe's backbone is not on this machine)"
            else:
                fresh = generate(untrained, captions, queries, pairs, seeds, steps, guidance, batch_size, SpeedMeter(pipe.device), progress,
                                 f"{card.name} (untrained head)")
                results[f"{card.name}/rmse_untrained"] = pixel_rmse(as_batch(fresh), as_batch(truths))
        else:
            agreements = [ok for (_, query), output in zip(families, outputs)
                          for ok in object_colour_agreement(output, query.instances, [o.colour for o in query.objects])]
            results[f"{card.name}/object_colour_agreement"] = float(np.mean(agreements)) if agreements else 0.0
        if card.name in UNSEEN_TASKS:
            results[f"{card.name}/placement_iou"] = float(np.mean(
                [mask_iou(non_background_mask(output), query.instances > 0) for (_, query), output in zip(families, outputs)]))
        first = triplets[0]
        picture_rows.append([first["example_source"], first["example_target"], first["query"], outputs[0], first["target"]])

    trained = [results[f"{c.name}/task_following"] for c in cards if c.name in TRAINED_TASKS]
    unseen = [results[f"{c.name}/task_following"] for c in cards if c.name in UNSEEN_TASKS]
    results |= {"task_following/trained_min": min(trained)} if trained else {}
    results |= {"task_following/unseen_min": min(unseen)} if unseen else {}
    results["query_following/mean"] = float(np.mean([results[f"{c.name}/query_following"] for c in cards]))
    row_names = [card.name for card in cards]
    columns = list(dict.fromkeys([*TARGET_MODALITIES, *(card.source for card in cards)]))
    matrix = confusion_matrix(nearest_rows, nearest_columns, row_names, columns)
    for r, row in enumerate(row_names):
        for c, column in enumerate(columns):
            results[f"confusion/{row}/{column}"] = float(matrix[r, c])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # icd eval already refused an --out holding results, unless --overwrite
        save_image(confusion_picture(matrix, row_names, columns), out / "confusion_matrix.png", overwrite=True)
        save_image(in_context_picture(picture_rows, row_names), out / "in_context.png", overwrite=True)
    return results


def upscaled(image: np.ndarray, cell: int = PICTURE_CELL) -> Image.Image:
    """An image enlarged nearest-neighbour to `cell` px on its long side (pixels stay sharp)."""
    pil = load_rgb(image)
    factor = max(1, cell // max(pil.size))
    return pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)


def in_context_picture(rows: list[list[np.ndarray]], tasks: list[str]) -> Image.Image:
    """One row per task: example source | example target | query | output | ground truth (of one query scene)."""
    labels = [f"{task}: {part}" if part == "example source" else part for task in tasks
              for part in ("example source", "example target", "query", "output", "ground truth")]
    return make_grid([[upscaled(image) for image in row] for row in rows], labels=labels)


def confusion_picture(matrix: np.ndarray, rows: list[str], columns: list[str], cell: int = 72) -> Image.Image:
    """The confusion matrix as a picture: rows the example pair's task, columns what the outputs were nearest to."""
    font = ImageFont.load_default()
    left = max(int(font.getlength(row)) for row in rows) + 12
    top = 28
    picture = Image.new("RGB", (left + cell * len(columns), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(picture)
    for c, column in enumerate(columns):
        draw.text((left + c * cell + 4, 8), column, fill="black", font=font)
    for r, row in enumerate(rows):
        draw.text((4, top + r * cell + cell // 2 - 6), row, fill="black", font=font)
        for c in range(len(columns)):
            shade = int(round(255 * (1 - matrix[r, c])))  # white = 0, dark blue = 1
            box = (left + c * cell, top + r * cell, left + (c + 1) * cell - 2, top + (r + 1) * cell - 2)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + cell // 2 - 14, box[1] + cell // 2 - 6), f"{matrix[r, c]:.2f}", fill="black" if shade > 120 else "white", font=font)
    return picture
