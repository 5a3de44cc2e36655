"""Condition maps for in-context tasks: a registry of annotators keyed by the task cards' names.

A task card names, for each modality it uses, the annotator that makes its maps
(`annotator: {depth: midas}`). An annotator is registered once, with `register_annotator`: the
modality it draws, the exact map of a synthetic scene (no weights, no download), and optionally
the loader of its real-image model. A new modality is therefore one registered function and a card.

Real images (Prompt Diffusion spec, "Annotators"):
- depth (`midas`): controlnet-aux `MidasDetector` (DPT-Hybrid, `lllyasviel/Annotators`
  dpt_hybrid-midas-501f0c75.pt), min-max normalised like the paper;
- hed (`hed`): controlnet-aux `HEDdetector` (`ControlNetHED.pth`, HED 1.1; the paper used ControlNet-1.0's HED);
- seg (`upernet_ade20k`): transformers UperNet on ADE20K (`openmmlab/upernet-convnext-small`) drawn
  with the ADE palette (the paper used UniFormer; a documented deviation);
- canny (`canny`): OpenCV's Canny (thresholds 100/200), no weights;
- normal (`midas_normal`): synthetic scenes only (their exact normals).
Every map is an RGB uint8 image of the input's size, saved as `{stem}_{modality}.png` in the cache
folder; an existing file is never recomputed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from rich.progress import track

from ..core.images import list_images, load_rgb, save_image
from ..errors import UserError
from .synthscenes import Scene

Map = np.ndarray  # HxWx3 uint8
# Semantic classes of the synthetic scenes (floor, wall, sphere, cube, cylinder) in ADE20K colours:
# floor, wall, then ball, box and column (pole for the cylinder).
SYNTHETIC_SEG_PALETTE = np.array([(80, 50, 50), (120, 120, 120), (0, 255, 20), (0, 255, 255), (255, 0, 112)], np.uint8)


@dataclass(frozen=True)
class Annotator:
    """How one modality's maps are made: exactly from a synthetic scene, and (if it can) from a photo."""

    modality: str
    from_scene: Callable[[Scene], Map]
    load: Callable[[], Callable[[Map], Map]] | None = None  # builds the photo annotator (loads its weights)
    weights: str | None = None  # what `load` needs, named in the offline message


ANNOTATORS: dict[str, Annotator] = {}


def register_annotator(name: str, modality: str, from_scene: Callable[[Scene], Map],
                       load: Callable[[], Callable[[Map], Map]] | None = None, weights: str | None = None) -> None:
    """Make `name` usable in task cards (`annotator: {modality: name}`)."""
    if modality == "image":
        raise ValueError("'image' is the scene or photo itself: it needs no annotator")
    ANNOTATORS[name] = Annotator(modality, from_scene, load, weights)


def modalities() -> list[str]:
    """Every modality a map can be made for, the image first."""
    return ["image", *dict.fromkeys(a.modality for a in ANNOTATORS.values())]


def annotator_for(modality: str, name: str | None = None) -> Annotator:
    """The annotator `name` (checked to draw `modality`), or the first one registered for `modality`."""
    if name is not None:
        if name not in ANNOTATORS:
            raise UserError(f"unknown annotator '{name}': choose one of {', '.join(sorted(ANNOTATORS))} (or register one in data/annotators.py)")
        if ANNOTATORS[name].modality != modality:
            raise UserError(f"annotator '{name}' draws {ANNOTATORS[name].modality} maps, not {modality}: name a {modality} annotator")
        return ANNOTATORS[name]
    for annotator in ANNOTATORS.values():
        if annotator.modality == modality:
            return annotator
    raise UserError(f"unknown modality '{modality}': choose one of {', '.join(modalities())}")


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


def synthetic_map(scene: Scene, modality: str, annotator: str | None = None) -> Map:
    """The exact `modality` map of a synthetic scene as an HxWx3 uint8 image (`annotator`: a card's choice)."""
    if modality == "image":
        return scene.rgb
    return annotator_for(modality, annotator).from_scene(scene)


# ---------------------------------------------------------------------------- real annotators


def offline_message(modality: str, weights: str) -> str:
    return (
        f"the {modality} annotator needs the weights {weights}, which are not on this machine and the hub is unreachable: "
        "download them once with network access (they are cached), or train on synthetic scenes (data.source: synthscenes)"
    )


def load_annotator(modality: str, name: str | None = None) -> Callable[[Map], Map]:
    """A callable RGB uint8 array -> RGB uint8 map of the same size: the annotator `name`, or the
    first registered one that annotates photos for `modality`."""
    if name is None:
        for_photos = [a for a in ANNOTATORS.values() if a.load is not None]
        matching = [a for a in for_photos if a.modality == modality]
        if not matching:
            raise UserError(f"unknown annotation task '{modality}': choose from {', '.join(dict.fromkeys(a.modality for a in for_photos))}")
        annotator = matching[0]
    else:
        annotator = annotator_for(modality, name)
        if annotator.load is None:
            raise UserError(f"annotator '{name}' draws synthetic scenes only: annotate photos with another {modality} annotator")
    try:
        return annotator.load()
    except OSError:
        raise UserError(offline_message(modality, annotator.weights)) from None


def _midas():
    from controlnet_aux import MidasDetector

    detector = MidasDetector.from_pretrained("lllyasviel/Annotators")
    return lambda rgb: _resized(detector(rgb, output_type="np"), rgb)


def _hed():
    from controlnet_aux import HEDdetector

    detector = HEDdetector.from_pretrained("lllyasviel/Annotators")
    return lambda rgb: _resized(detector(rgb, output_type="np"), rgb)


def _resized(annotated: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """controlnet-aux works at its own resolution; maps are stored at the image's size."""
    image = Image.fromarray(annotated if annotated.ndim == 3 else gray_to_rgb(annotated))
    return np.asarray(load_rgb(image, size=(rgb.shape[1], rgb.shape[0])))


def _upernet_ade20k(name: str = "openmmlab/upernet-convnext-small"):
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
    return any(path.stem.endswith(f"_{modality}") for modality in modalities()[1:])


def map_path(image_path: Path, task: str, source: Path, cache: Path | None) -> Path:
    """Where the `task` map of `image_path` is stored (PNG: lossless, unlike the paper's JPEGs)."""
    folder = image_path.parent if cache is None else Path(cache) / image_path.parent.relative_to(source)
    return folder / f"{image_path.stem}_{task}.png"


register_annotator("midas", "depth", lambda scene: depth_to_image(scene.depth), _midas, "lllyasviel/Annotators (dpt_hybrid-midas-501f0c75.pt)")
register_annotator("hed", "hed", lambda scene: gray_to_rgb(scene.edges), _hed, "lllyasviel/Annotators (ControlNetHED.pth)")
register_annotator("upernet_ade20k", "seg", lambda scene: SYNTHETIC_SEG_PALETTE[scene.semantic], _upernet_ade20k, "openmmlab/upernet-convnext-small")
register_annotator("canny", "canny", lambda scene: canny(scene.rgb), lambda: canny)
register_annotator("midas_normal", "normal", lambda scene: np.round((scene.normals + 1.0) / 2.0 * 255.0).astype(np.uint8))
