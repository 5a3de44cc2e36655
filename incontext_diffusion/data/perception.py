"""Readers for the perception datasets of MetaPrompts, and synthetic-scene twins for the tiny recipes.

Every dataset is deterministic by index (augmentation happens in the training step, from the global
torch RNG) and returns a dict:
- depth: {"image": (3, H, W) float in [-1, 1], "depth": (1, H, W) float metres, 0 = no measurement};
- segmentation: {"image": ..., "labels": (H, W) int64 class ids, 255 = ignore}.

Layouts (paths in split files are relative to the split file's folder unless `root` is given):
- NYUv2: split file lines `RGB DEPTH [FOCAL]`, depth a 16-bit PNG in millimetres (BTS/GLPDepth lists).
- KITTI Eigen: split file lines `RGB DEPTH FOCAL`, depth a 16-bit PNG of metres x 256; lines whose
  depth is `None` are skipped; images are KB-cropped to 352 x 1216 (bottom rows, centred columns).
- ADE20K: `ADEChallengeData2016/{images,annotations}/{training,validation}/`, labels reduced
  (0 -> 255, c -> c - 1: 150 classes).
- Cityscapes: `leftImg8bit/SPLIT/CITY/*_leftImg8bit.png` with `gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png` (19 classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.images import load_depth_png, load_map, load_rgb, to_tensor
from ..errors import UserError
from .synthscenes import CLASSES, render_scene

KB_CROP = (352, 1216)


def _image(rgb: Image.Image) -> torch.Tensor:
    return to_tensor(rgb)  # [-1, 1]


def _read_split(split_file: Path, columns: int) -> list[list[str]]:
    split_file = Path(split_file)
    if not split_file.is_file():
        raise UserError(f"split file {split_file} does not exist: pass the text file that lists 'RGB DEPTH [FOCAL]' per line")
    rows = [line.split() for line in split_file.read_text().splitlines() if line.strip()]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) < columns]
    if bad:
        raise UserError(f"{split_file} line {bad[0]} has fewer than {columns} fields: each line needs 'RGB DEPTH [FOCAL]'")
    return rows


class NYUv2Depth(torch.utils.data.Dataset):
    """NYUv2 pairs from a split file (RGB and 16-bit depth PNG in mm), at 480 x 640."""

    depth_scale, max_depth, crop = 1000.0, 10.0, "nyu_eigen"

    def __init__(self, split_file: str | Path, root: str | Path | None = None):
        self.root = Path(root) if root else Path(split_file).parent
        self.pairs = [(row[0].lstrip("/"), row[1].lstrip("/")) for row in _read_split(Path(split_file), 2)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        rgb, depth = self.pairs[index]
        depth_m = load_depth_png(self.root / depth, self.depth_scale)
        return {"image": _image(load_rgb(self.root / rgb)), "depth": torch.from_numpy(depth_m)[None]}


class KITTIDepth(NYUv2Depth):
    """KITTI Eigen split (depth PNG / 256), KB-cropped to 352 x 1216."""

    depth_scale, max_depth, crop = 256.0, 80.0, "kitti_garg"

    def __init__(self, split_file: str | Path, root: str | Path | None = None):
        self.root = Path(root) if root else Path(split_file).parent
        self.pairs = [(row[0].lstrip("/"), row[1].lstrip("/")) for row in _read_split(Path(split_file), 2) if row[1] != "None"]

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        h, w = sample["image"].shape[-2:]
        if h < KB_CROP[0] or w < KB_CROP[1]:
            raise UserError(f"KITTI image {self.pairs[index][0]} is {w}x{h}, smaller than the 1216x352 KB crop: use the raw KITTI images")
        top, left = h - KB_CROP[0], (w - KB_CROP[1]) // 2
        return {key: value[..., top : top + KB_CROP[0], left : left + KB_CROP[1]] for key, value in sample.items()}


def _resize_short_side(rgb: Image.Image, labels: np.ndarray, short_side: int | None) -> tuple[Image.Image, np.ndarray]:
    if short_side is None or min(rgb.size) == short_side:
        return rgb, labels
    scale = short_side / min(rgb.size)
    size = (round(rgb.width * scale), round(rgb.height * scale))
    return rgb.resize(size, Image.Resampling.BILINEAR), np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))


class ADE20K(torch.utils.data.Dataset):
    """ADE20K scene parsing (150 classes, reduce_zero_label); optionally resized to a short side."""

    num_classes = 150

    def __init__(self, root: str | Path, split: str = "validation", short_side: int | None = None):
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.images = sorted((root / "images" / split).glob("*.jpg"))
        if not self.images:
            raise UserError(f"no ADE20K images in {root / 'images' / split}: pass the ADEChallengeData2016 folder")
        self.annotations = [root / "annotations" / split / f"{p.stem}.png" for p in self.images]
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, index: int) -> np.ndarray:
        raw = load_map(self.annotations[index]).astype(np.int64)
        return np.where(raw == 0, 255, raw - 1)  # reduce_zero_label

    def __getitem__(self, index: int) -> dict:
        rgb, labels = _resize_short_side(load_rgb(self.images[index]), self.labels(index).astype(np.uint8), self.short_side)
        return {"image": _image(rgb), "labels": torch.from_numpy(labels.astype(np.int64))}


class Cityscapes(ADE20K):
    """Cityscapes fine annotations as train ids (19 classes, 255 = ignore)."""

    num_classes = 19

    def __init__(self, root: str | Path, split: str = "val", short_side: int | None = None):
        root = Path(root)
        self.images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise UserError(f"no Cityscapes images in {root / 'leftImg8bit' / split}: pass the folder holding leftImg8bit/ and gtFine/")
        self.annotations = [
            root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png") for p in self.images
        ]
        self.short_side = short_side

    def labels(self, index: int) -> np.ndarray:
        return load_map(self.annotations[index]).astype(np.int64)


class SynthDepth(torch.utils.data.Dataset):
    """Synthetic scenes with exact z-depth (metres); scene i is `render_scene(seed + i)`."""

    max_depth, crop = 10.0, None

    def __init__(self, n: int, size: int = 64, seed: int = 0, min_objects: int = 1, max_objects: int = 3):
        self.n, self.size, self.seed, self.objects = n, size, seed, (min_objects, max_objects)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return render_scene(self.seed + index, self.size, *self.objects)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": _image(Image.fromarray(scene.rgb)), "depth": torch.from_numpy(scene.depth.astype(np.float32))[None]}


class SynthSegmentation(SynthDepth):
    """Synthetic scenes with semantic labels (floor, wall, sphere, cube, cylinder)."""

    num_classes = len(CLASSES)
    class_names = CLASSES

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": _image(Image.fromarray(scene.rgb)), "labels": torch.from_numpy(scene.semantic.astype(np.int64))}
