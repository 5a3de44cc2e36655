"""InstructPix2Pix folders as Prompt Diffusion training triplets.

Layout (the InstructPix2Pix `clip-filtered-dataset`): `seeds.json` lists `[folder, [seed, ...]]`;
each folder holds `prompt.json` (with "input", "edit", "output" captions) and `{seed}_0.jpg` /
`{seed}_1.jpg` (before / after the edit). Maps come from `icd data annotate` as `{seed}_{i}_{task}.png`.

Sampling follows the paper: example and query come from the same folder; the example pair uses
`{seed}_0` (source map -> target map), the query and target use `{seed}_1` of an independently
drawn seed (the two seeds may coincide). The split is by folder order in seeds.json: 90 / 5 / 5.
Item i is a function of (seed, i) only, so the dataset is deterministic by index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.images import load_rgb
from ..errors import UserError
from ..recipes import TaskCard
from .annotators import map_path

SPLITS = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}


def read_seeds(root: Path) -> list[tuple[str, list[int]]]:
    """The (folder, seeds) list of an InstructPix2Pix dataset, checked."""
    path = Path(root) / "seeds.json"
    if not path.is_file():
        raise UserError(f"{root} is not an InstructPix2Pix folder (no seeds.json): pass the folder that holds seeds.json")
    try:
        entries = json.loads(path.read_text())
        return [(str(folder), [int(s) for s in seeds]) for folder, seeds in entries if seeds]
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a list of [folder, [seeds...]] entries ({err}): check the file") from None


def split_folders(entries: list[tuple[str, list[int]]], split: str) -> list[tuple[str, list[int]]]:
    """The folders of one split, by folder order: train 90 %, val 5 %, test 5 %."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': choose train, val or test")
    low, high = SPLITS[split]
    return entries[int(round(low * len(entries))) : int(round(high * len(entries)))]


class IP2PTriplets:
    """In-context triplets from an annotated InstructPix2Pix folder, one folder per item.

    Item i: a dict of HxWx3 uint8 images `example_source`, `example_target`, `query`, `target`,
    plus `caption` (the folder's "output" caption, or the task's fixed text for forward tasks) and `task` (the task card's name).
    """

    def __init__(self, root: str | Path, tasks: list[TaskCard], split: str = "train", size: int = 256, seed: int = 0, maps: str | Path | None = None):
        self.root, self.tasks, self.size, self.seed = Path(root), tasks, size, seed
        self.maps = Path(maps) if maps else None
        self.folders = split_folders(read_seeds(self.root), split)
        if not self.folders:
            raise UserError(f"the {split} split of {root} is empty: the dataset needs more folders")

    def __len__(self) -> int:
        return len(self.folders)

    def modality(self, image_path: Path, modality: str) -> np.ndarray:
        path = image_path if modality == "image" else map_path(image_path, modality, self.root, self.maps)
        if not path.is_file():
            raise UserError(f"missing {modality} map {path}: run `icd data annotate {self.root} --tasks {modality}` first")
        return np.asarray(load_rgb(path, size=self.size))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.folders):
            raise IndexError(f"index {index} out of range for {len(self.folders)} folders")  # also ends iteration
        rng = np.random.default_rng([self.seed, index])
        folder, seeds = self.folders[index]
        task = self.tasks[rng.integers(len(self.tasks))]
        example_seed, query_seed = seeds[rng.integers(len(seeds))], seeds[rng.integers(len(seeds))]
        example = self.root / folder / f"{example_seed}_0.jpg"
        query = self.root / folder / f"{query_seed}_1.jpg"
        caption = json.loads((self.root / folder / "prompt.json").read_text())["output"]
        return {
            "example_source": self.modality(example, task.source),
            "example_target": self.modality(example, task.target),
            "query": self.modality(query, task.source),
            "target": self.modality(query, task.target),
            "caption": caption if task.text is None else task.text,  # forward tasks: fixed text
            "task": task.name,
        }
