"""Condition maps for in-context tasks: real annotators with an on-disk cache, and exact maps of
synthetic scenes.

Real images (Prompt Diffusion spec, "Annotators"):
- depth: controlnet-aux `MidasDetector` (DPT-Hybrid, `lllyasviel/Annotators` dpt_hybrid-midas-501f0c75.pt),
  min-max normalised like the paper;
- hed: controlnet-aux `HEDdetector` (`ControlNetHED.pth`, HED 1.1; the paper used ControlNet-1.0's HED);
- seg: transformers UperNet on ADE20K (`openmmlab/upernet-convnext-small`) drawn with the ADE palette
  (the paper used UniFormer; a documented deviation);
- canny: controlnet-aux `CannyDetector` (thresholds 100/200), no weights.
Every map is an RGB uint8 image of the input's size, saved as `{stem}_{task}.png` in the cache
folder; an existing file is never recomputed, so an interrupted run resumes where it stopped.

Synthetic scenes carry their own exact maps (`synthetic_map`): no annotator, no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from ..core.images import list_images, load_rgb, save_image
from ..errors import UserError
from .synthscenes import Scene

ANNOTATOR_WEIGHTS = {
    "depth": "lllyasviel/Annotators (dpt_hybrid-midas-501f0c75.pt)",
    "hed": "lllyasviel/Annotators (ControlNetHED.pth)",
    "seg": "openmmlab/upernet-convnext-small",
    "canny": None,
}
# Semantic classes of the synthetic scenes (floor, wall, sphere, cube, cylinder) in ADE20K colours:
# floor, wall, then ball, box and column (pole for the cylinder).
SYNTHETIC_SEG_PALETTE = np.array([(80, 50, 50), (120, 120, 120), (0, 255, 20), (0, 255, 255), (255, 0, 112)], np.uint8)
MODALITIES = ("image", "depth", "hed", "seg", "canny", "normal")


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def depth_to_image(depth_m: np.ndarray) -> np.ndarray:
    """Depth drawn like MiDaS output: inverse depth, min-max normalised per image, near is bright."""
    inverse = 1.0 / np.maximum(depth_m, 1e-6)
    scaled = (inverse - inverse.min()) / max(float(inverse.max() - inverse.min()), 1e-6)
    return gray_to_rgb(np.round(255 * scaled).astype(np.uint8))


def canny(rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    import cv2

    return gray_to_rgb(cv2.Canny(rgb, low, high))


def synthetic_map(scene: Scene, modality: str) -> np.ndarray:
    """The exact `modality` map of a synthetic scene as an HxWx3 uint8 image."""
    if modality == "image":
        return scene.rgb
    if modality == "depth":
        return depth_to_image(scene.depth)
    if modality == "hed":
        return gray_to_rgb(scene.edges)
    if modality == "seg":
        return SYNTHETIC_SEG_PALETTE[scene.semantic]
    if modality == "canny":
        return canny(scene.rgb)
    if modality == "normal":
        return np.round((scene.normals + 1.0) / 2.0 * 255.0).astype(np.uint8)
    raise UserError(f"unknown modality '{modality}': choose one of {', '.join(MODALITIES)}")


# ---------------------------------------------------------------------------- real annotators


def offline_message(task: str) -> str:
    return (
        f"the {task} annotator needs the weights {ANNOTATOR_WEIGHTS[task]}, which are not on this machine and the hub is unreachable: "
        "download them once with network access (they are cached), or train on synthetic scenes (data.source: synthscenes)"
    )


def load_annotator(task: str):
    """A callable RGB uint8 array -> RGB uint8 map of the same size, for one task."""
    if task not in ANNOTATOR_WEIGHTS:
        raise UserError(f"unknown annotation task '{task}': choose from {', '.join(ANNOTATOR_WEIGHTS)}")
    if task == "canny":
        return canny
    try:
        if task == "depth":
            from controlnet_aux import MidasDetector

            detector = MidasDetector.from_pretrained("lllyasviel/Annotators")
            return lambda rgb: _resized(detector(rgb, output_type="np"), rgb)
        if task == "hed":
            from controlnet_aux import HEDdetector

            detector = HEDdetector.from_pretrained("lllyasviel/Annotators")
            return lambda rgb: _resized(detector(rgb, output_type="np"), rgb)
        return _upernet_ade20k(ANNOTATOR_WEIGHTS["seg"])
    except OSError:
        raise UserError(offline_message(task)) from None


def _resized(annotated: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """controlnet-aux works at its own resolution; maps are stored at the image's size."""
    image = Image.fromarray(annotated if annotated.ndim == 3 else gray_to_rgb(annotated))
    return np.asarray(load_rgb(image, size=(rgb.shape[1], rgb.shape[0])))


def _upernet_ade20k(name: str):
    import torch
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(name)
    model = UperNetForSemanticSegmentation.from_pretrained(name).eval()
    palette = ade_palette()

    @torch.no_grad()
    def segment(rgb: np.ndarray) -> np.ndarray:
        inputs = processor(images=Image.fromarray(rgb), return_tensors="pt")
        logits = model(**inputs).logits
        labels = processor.post_process_semantic_segmentation(logits_to_outputs(logits), target_sizes=[rgb.shape[:2]])[0]
        return palette[labels.numpy()]

    return segment


def logits_to_outputs(logits):
    from transformers.modeling_outputs import SemanticSegmenterOutput

    return SemanticSegmenterOutput(logits=logits)


def ade_palette() -> np.ndarray:
    """150 distinct ADE20K class colours (a fixed pseudo-random palette, wall and floor first as in ADE)."""
    rng = np.random.default_rng(150)
    palette = rng.integers(0, 256, size=(150, 3)).astype(np.uint8)
    palette[0], palette[3] = (120, 120, 120), (80, 50, 50)
    return palette


def annotate_folder(source: Path, tasks: list[str], cache: Path | None = None) -> Path:
    """Annotate every image under `source` (recursively, `_0` and `_1` images alike) for `tasks`.

    Maps go to `cache` (default: beside each image) as `{stem}_{task}.png`; existing maps are
    skipped, so a second run resumes. Returns the cache root.
    """
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source} is not a folder: pass the dataset folder (e.g. an InstructPix2Pix folder)")
    folders = sorted({p.parent for p in source.rglob("*") if p.is_file()})
    images = [p for folder in folders for p in list_images_or_none(folder) if not is_map_file(p)]
    if not images:
        raise UserError(f"no images under {source}: expected files like SEED_0.jpg and SEED_1.jpg")
    for task in tasks:
        todo = [p for p in images if not map_path(p, task, source, cache).is_file()]
        if not todo:
            print(f"{task}: all {len(images)} maps already cached")
            continue
        annotator = load_annotator(task)
        for image_path in track(todo, description=f"{task}: {len(todo)} of {len(images)} images"):
            annotated = annotator(np.asarray(load_rgb(image_path)))
            save_image(Image.fromarray(annotated), map_path(image_path, task, source, cache))
    return cache or source


def list_images_or_none(folder: Path) -> list[Path]:
    try:
        return list_images(folder)
    except UserError:
        return []


def is_map_file(path: Path) -> bool:
    return any(path.stem.endswith(f"_{task}") for task in (*ANNOTATOR_WEIGHTS, "normal"))


def map_path(image_path: Path, task: str, source: Path, cache: Path | None) -> Path:
    """Where the `task` map of `image_path` is stored (PNG: lossless, unlike the paper's JPEGs)."""
    folder = image_path.parent if cache is None else Path(cache) / image_path.parent.relative_to(source)
    return folder / f"{image_path.stem}_{task}.png"
