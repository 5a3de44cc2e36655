"""Referring-expression data for Diff-Prompt: RefCOCO (UNC) and synthetic referring expressions.

RefCOCO is read from
- the MDETR-style json (`finetune_refcoco_{train,val,testA,testB}.json`): COCO layout, one "image"
  entry per expression (its `caption`, `file_name`, `height`, `width`) and its one annotation (`bbox`
  as COCO x, y, w, h and `segmentation` polygons), over the COCO train2014 image folder; or
- a `datasets` parquet copy with an `image` column, a text column (`caption`, `sentence`, `text` or
  `question`), `bbox` (x, y, w, h) and optionally `segmentation` polygons.
Masks are rasterised from the COCO polygons here (no pycocotools needed). The original
`refs(unc).p` is a Python pickle, and unpickling can run code: `load_refs_pickle` refuses it unless
`trust_pickle=True` (`--trust-pickle` on the command line).

Every sample is an `RefExpSample`: the image resized to a square (the paper's fixed-resolution
input), the expression, the box normalised to [0, 1] xyxy and the mask at the same square size.
Synthetic samples come from `data/synthscenes.py`, one per referring expression of each scene;
their `kind` (unique / extreme / relation) gives the evaluation splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.images import load_rgb
from ..errors import UserError
from .synthscenes import render_scene

REFCOCO_SPLITS = ("train", "val", "testA", "testB")
SYNTHETIC_SPLITS = ("all", "unique", "extreme", "relation")
TEXT_COLUMNS = ("caption", "sentence", "text", "question")


@dataclass
class RefExpSample:
    """One expression: image (S, S, 3) uint8, text, box normalised xyxy, mask (S, S) bool."""

    image: np.ndarray
    text: str
    box: tuple[float, float, float, float]
    mask: np.ndarray | None
    kind: str = "refcoco"


def expression_kind(text: str) -> str:
    """Which synthetic grammar rule made an expression."""
    if " of the " in text:
        return "relation"
    if "leftmost" in text or "rightmost" in text:
        return "extreme"
    return "unique"


def rasterize_polygons(polygons: list[list[float]], height: int, width: int, size: int) -> np.ndarray:
    """COCO polygons (flat x, y lists in original pixels) -> (size, size) bool mask of the square-resized image."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) < 6:
            continue
        points = [(x * size / width, y * size / height) for x, y in zip(polygon[0::2], polygon[1::2])]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _normalised_box(bbox: list[float], height: int, width: int) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise UserError(f"a RefCOCO box has non-positive size {bbox}: expected COCO (x, y, w, h)")
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def _polygons(segmentation) -> list[list[float]]:
    if segmentation is None:
        return []
    if isinstance(segmentation, dict):
        raise UserError("RLE segmentations are not supported: convert them to polygons, or drop the segmentation column")
    return [list(p) for p in segmentation]


class MdetrRefExp:
    """RefCOCO from an MDETR-style json over a COCO image folder; item i is a RefExpSample."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, size: int = 224):
        annotation_file, self.image_dir, self.size = Path(annotation_file), Path(image_dir), size
        if not annotation_file.is_file():
            raise UserError(f"RefCOCO annotations not found: '{annotation_file}': pass the MDETR finetune_refcoco_<split>.json")
        if not self.image_dir.is_dir():
            raise UserError(f"COCO image folder not found: '{self.image_dir}': pass the train2014 folder")
        try:
            data = json.loads(annotation_file.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{annotation_file} is not valid JSON (line {err.lineno}): re-download the MDETR annotations") from None
        if not {"images", "annotations"} <= set(data):
            raise UserError(f"{annotation_file} has no 'images'/'annotations': expected an MDETR-style RefCOCO json")
        by_image = {}
        for annotation in data["annotations"]:
            by_image.setdefault(annotation["image_id"], annotation)
        self.entries = [(image, by_image[image["id"]]) for image in data["images"] if image["id"] in by_image]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> RefExpSample:
        image, annotation = self.entries[index]
        height, width = image["height"], image["width"]
        rgb = np.asarray(load_rgb(self.image_dir / image["file_name"], size=self.size))
        mask = rasterize_polygons(_polygons(annotation.get("segmentation")), height, width, self.size)
        return RefExpSample(rgb, image["caption"], _normalised_box(annotation["bbox"], height, width), mask)


class ParquetRefExp:
    """RefCOCO from a `datasets` parquet copy (columns: image, a text column, bbox, optional segmentation)."""

    def __init__(self, files: str | Path | list, size: int = 224):
        from datasets import load_dataset

        paths = [str(p) for p in (files if isinstance(files, list) else sorted(Path(files).glob("*.parquet")) if Path(files).is_dir() else [files])]
        if not paths or not all(Path(p).is_file() for p in paths):
            raise UserError(f"no parquet file at '{files}': pass a .parquet file or a folder of them")
        self.data = load_dataset("parquet", data_files=paths, split="train")
        self.text_column = next((c for c in TEXT_COLUMNS if c in self.data.column_names), None)
        missing = [c for c in ("image", "bbox") if c not in self.data.column_names] + ([] if self.text_column else ["caption"])
        if missing:
            raise UserError(f"the parquet copy lacks column(s) {', '.join(missing)}: it needs image, bbox and one of {', '.join(TEXT_COLUMNS)}")
        self.size = size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> RefExpSample:
        row = self.data[index]
        image = row["image"]
        width, height = image.size
        rgb = np.asarray(load_rgb(image, size=self.size))
        mask = rasterize_polygons(_polygons(row.get("segmentation")), height, width, self.size) if "segmentation" in row else None
        return RefExpSample(rgb, row[self.text_column], _normalised_box(row["bbox"], height, width), mask)


def load_refs_pickle(path: str | Path, trust_pickle: bool = False):
    """The original refer toolkit's `refs(unc).p`; refused unless the user trusts the file."""
    if not trust_pickle:
        raise UserError(f"'{path}' is a pickle, and unpickling can run code from the file: pass --trust-pickle if you trust it, or use the MDETR json")
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - the user asked for it


def synthetic_referring(num_scenes: int, size: int = 64, seed: int = 0, min_objects: int = 1, max_objects: int = 3, split: str = "all") -> list[RefExpSample]:
    """Every referring expression of scenes seed..seed+num_scenes-1 (held-out scenes: seed >= 1_000_000)."""
    if split not in SYNTHETIC_SPLITS:
        raise UserError(f"unknown synthetic split {split!r}: choose one of {', '.join(SYNTHETIC_SPLITS)}")
    samples = []
    for scene_seed in range(seed, seed + num_scenes):
        scene = render_scene(scene_seed, size, min_objects, max_objects)
        for ref in scene.referring:
            x1, y1, x2, y2 = ref.box
            sample = RefExpSample(scene.rgb, ref.text, (x1 / size, y1 / size, x2 / size, y2 / size), ref.mask, expression_kind(ref.text))
            if split in ("all", sample.kind):
                samples.append(sample)
    return samples


def load_refexp(source: str, path: str | None, split: str, size: int, num_scenes: int = 100, seed: int = 1_000_000,
                min_objects: int = 1, max_objects: int = 3):
    """Samples of one split: synthetic (`source` synthscenes) or RefCOCO (`path` = a folder with
    `finetune_refcoco_<split>.json` and `train2014/`, or a parquet file/folder)."""
    if source == "synthscenes":
        return synthetic_referring(num_scenes, size, seed, min_objects, max_objects, split)
    if source != "refcoco":
        raise UserError(f"data source {source!r} has no referring expressions: use synthscenes or refcoco")
    if path is None:
        raise UserError("RefCOCO needs data.path (or --data): a folder with MDETR jsons and train2014/, or parquet files")
    folder = Path(path)
    if folder.suffix == ".parquet" or (folder.is_dir() and any(folder.glob("*.parquet"))):
        return ParquetRefExp(folder, size)
    return MdetrRefExp(folder / f"finetune_refcoco_{split}.json", folder / "train2014", size)
