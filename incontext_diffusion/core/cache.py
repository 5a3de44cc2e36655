"""Precomputed frozen-encoder outputs: `icd data cache` and the recipes' `data.cache: DIR`.

The frozen VAE encoder and text encoder cost more per step than the trained part of some heads
(SD1.5 at 256²: 273 GFLOP of VAE encoding per image against 493 for the ControlNet step). A head
that opts in (`Head.cache_features`) turns each collated batch of its training data into the
per-sample tensors it needs: the inputs it still reads and the encoders' outputs (e.g. the VAE
posterior moments, so that the latent is still sampled fresh each step, and the text embedding).
They are written once as Arrow shards with `datasets`; training memory-maps them and reads only
the samples of its batches, so the cache may be far larger than memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from rich.progress import track

from ..errors import UserError

INDEX = "cache_index.json"
ARRAY_FEATURES = {2: "Array2D", 3: "Array3D", 4: "Array4D", 5: "Array5D"}


def features_of(sample: dict[str, np.ndarray]):
    """Fixed-shape Arrow features, so that samples come back as tensors without per-element lists."""
    import datasets

    features = {}
    for key, value in sample.items():
        if value.ndim in ARRAY_FEATURES:
            features[key] = getattr(datasets, ARRAY_FEATURES[value.ndim])(shape=value.shape, dtype=str(value.dtype))
        elif value.ndim == 1:
            features[key] = datasets.Sequence(datasets.Value(str(value.dtype)), length=value.shape[0])
        else:
            features[key] = datasets.Value(str(value.dtype))
    return datasets.Features(features)


def write_cache(head, out: Path, batch_size: int = 16, samples_per_shard: int = 2048) -> int:
    """Encode the head's whole training set into `out` (a new folder); returns the sample count."""
    import datasets

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder for the cache")
    head.build()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in head.frozen():
        module.to(device)
    dataset = head.train_dataset()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=head.collate)

    def encode(batch) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {key: value.cpu().numpy() for key, value in head.cache_features(send_to_device(batch, device)).items()}

    def samples():
        for batch in track(loader, description="encoding", total=len(loader)):
            features = encode(batch)
            for i in range(len(next(iter(features.values())))):
                yield {key: value[i] for key, value in features.items()}

    first = {key: value[0] for key, value in encode(next(iter(loader))).items()}  # the features' shapes and types
    temp = out.with_name(out.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    arrow = datasets.Dataset.from_generator(samples, features=features_of(first), cache_dir=str(temp / "build"))
    arrow.save_to_disk(str(temp / "data"), num_shards=max(1, len(arrow) // samples_per_shard))
    shutil.rmtree(temp / "build")
    recipe = head.recipe
    index = {"head": recipe.head, "recipe": recipe.name, "backbone": recipe.backbone, "size": recipe.data.size,
             "samples": len(arrow), "keys": sorted(first)}
    (temp / INDEX).write_text(json.dumps(index, indent=1))
    temp.rename(out)  # a cache exists whole or not at all
    return len(arrow)


def load_cache(folder: str | Path, head) -> torch.utils.data.Dataset:
    """The cache at `folder` as a map-style dataset of tensors, checked against the recipe."""
    import datasets

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise UserError(f"{folder} is not a feature cache (no {INDEX}): write one with `icd data cache --recipe ... --out {folder}`")
    index = json.loads((folder / INDEX).read_text())
    recipe = head.recipe
    written = (index["head"], index["backbone"], index["size"])
    if written != (recipe.head, recipe.backbone, recipe.data.size):
        raise UserError(
            f"the cache {folder} was written for head {written[0]}, backbone {written[1]}, size {written[2]}, "
            f"but the recipe asks for {recipe.head}, {recipe.backbone}, {recipe.data.size}: write a cache for this recipe"
        )
    return datasets.load_from_disk(str(folder / "data")).with_format("torch")
