"""Inference and evaluation of an exported Prompt Diffusion model.

Forward tasks (image -> map) are scored with RMSE on pixels / 255 against the ground-truth map
(the paper's protocol), with PSNR and SSIM beside it, and against the baseline of copying the
example's target map. Inverse tasks (map -> image) get FID through the metrics package when
`--inception-weights` is given, and PSNR / SSIM / RMSE against the ground-truth image (synthetic
scenes have one). Held-out synthetic scenes start at seed 1_000_000; their example and query
scenes differ in layout (the same objects moved), so copying the example is not the answer.
Forward tasks on synthetic scenes are also scored on the recoloured families of the same seeds
(`TASK/colour_*`: maps identical to the example's, so copying is exact there) and on both sets
together (`TASK/all_*`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from rich.progress import Progress, track

from ...core.images import load_rgb
from ...errors import UserError
from ...metrics.generation import FID, GenerationMetrics, pixel_rmse
from ...recipes import load_task
from .data import HELD_OUT_SEED, synthetic_triplet
from .pipeline import PromptDiffusionPipeline

DEFAULT_TASKS = ["image_to_depth", "image_to_hed", "image_to_seg", "depth_to_image", "hed_to_image", "seg_to_image"]


def load_pipeline(model_dir: Path) -> PromptDiffusionPipeline:
    try:
        pipe = PromptDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir} could not be loaded as a Prompt Diffusion model: {str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe: PromptDiffusionPipeline, prompt: str, source, target, query, steps: int = 50, guidance: float = 9.0,
                 seed: int = 0, show_progress: bool = False) -> Image.Image:
    """One output image, with a progress bar over the denoising steps when asked."""
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("denoising", total=steps)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            progress.advance(task)
            return callback_kwargs

        try:
            return pipe(prompt, query, [source, target], num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end).images[0]
        except ValueError as err:  # size and pair checks of the pipeline: the user's inputs
            raise UserError(str(err)) from None


def recipe_setting(model_dir: Path, section: str, key: str, default):
    """A setting of the recipe that trained the model (exported beside it), or `default`."""
    recipe = Path(model_dir) / "recipe.yaml"
    if recipe.is_file():
        return (yaml.safe_load(recipe.read_text()).get(section) or {}).get(key, default)
    return default


def eval_triplets(task, n: int, size: int, data: Path | None, change: str = "layout") -> list[dict]:
    if data is None:
        return [synthetic_triplet(HELD_OUT_SEED + i, task, size, change) for i in range(n)]
    from ...data.ip2p import IP2PTriplets

    triplets = IP2PTriplets(data, [task], split="test", size=size)
    return [triplets[i] for i in range(min(n, len(triplets)))]


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def generate(pipe: PromptDiffusionPipeline, triplets: list[dict], steps: int, guidance: float, seed: int, label: str) -> torch.Tensor:
    """The outputs for `triplets` as a uint8 (B, 3, H, W) batch; triplet i is sampled with seed + i."""
    outputs = []
    for i, triplet in enumerate(track(triplets, description=label, transient=True)):
        image = run_pipeline(pipe, triplet["caption"], triplet["example_source"], triplet["example_target"], triplet["query"], steps, guidance, seed + i)
        outputs.append(np.asarray(load_rgb(image, size=triplet["target"].shape[1::-1])))
    return as_batch(outputs)


def recoloured_scores(pipe, card, n: int, size: int, steps: int, guidance: float, seed: int,
                      layout_generated: torch.Tensor, layout_copied: torch.Tensor, layout_reference: torch.Tensor) -> dict:
    """RMSE of the model and of copying the example on the recoloured families (`colour_*`) and on
    the recoloured and moved families together (`all_*`)."""
    triplets = eval_triplets(card, n, size, None, change="colour")
    generated = generate(pipe, triplets, steps, guidance, seed, f"{card.name} (recoloured)")
    copied, reference = as_batch([t["example_target"] for t in triplets]), as_batch([t["target"] for t in triplets])
    all_reference = torch.cat([layout_reference, reference])
    return {
        f"{card.name}/colour_rmse": pixel_rmse(generated, reference),
        f"{card.name}/colour_rmse_copy_example": pixel_rmse(copied, reference),
        f"{card.name}/all_rmse": pixel_rmse(torch.cat([layout_generated, generated]), all_reference),
        f"{card.name}/all_rmse_copy_example": pixel_rmse(torch.cat([layout_copied, copied]), all_reference),
    }


def evaluate_model(model_dir: Path, tasks: list[str], data: Path | None = None, num_samples: int = 100, steps: int = 50, seed: int = 0,
                   inception_weights: Path | None = None, guidance: float | None = None) -> dict:
    """Scores per task (see the module docstring), as a flat dict for results.md / results.json."""
    cards = [load_task(name) for name in (tasks or DEFAULT_TASKS)]
    texts = recipe_setting(model_dir, "model", "task_texts", {}) or {}
    cards = [card.model_copy(update={"text": texts[card.name]}) if card.name in texts else card for card in cards]
    size = int(recipe_setting(model_dir, "data", "size", 64))
    guidance = guidance or float(recipe_setting(model_dir, "model", "guidance_scale", 9.0))
    inverse = [card for card in cards if card.target == "image"]
    fid_ready = inception_weights is not None
    if inverse and not fid_ready:
        print("FID is skipped: pass --inception-weights PATH (a local torch-fidelity Inception file); PSNR/SSIM are still computed")
    pipe = load_pipeline(model_dir)
    results: dict = {"num_samples": num_samples, "steps": steps, "guidance_scale": guidance, "data": str(data or "synthetic scenes (held out)")}
    for card in cards:
        triplets = eval_triplets(card, num_samples, size, data)
        generated, reference = generate(pipe, triplets, steps, guidance, seed, card.name), as_batch([t["target"] for t in triplets])
        metrics = GenerationMetrics()
        metrics.update(generated, reference)
        for name, value in metrics.compute().items():
            results[f"{card.name}/{name}"] = value
        if card.target != "image":
            copied = as_batch([t["example_target"] for t in triplets])
            results[f"{card.name}/rmse_copy_example"] = pixel_rmse(copied, reference)
            if data is None:
                results |= recoloured_scores(pipe, card, num_samples, size, steps, guidance, seed, generated, copied, reference)
        elif fid_ready:
            fid = FID(feature_extractor_weights_path=inception_weights)
            fid.update(reference, real=True)
            fid.update(generated, real=False)
            results[f"{card.name}/fid"] = fid.compute()
        else:
            results[f"{card.name}/fid"] = "skipped (no --inception-weights)"
    return results
