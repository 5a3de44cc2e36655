"""Sharded training data: `icd data shard` and the recipes' `data.shards: DIR_OR_URL`.

A shard set is a folder (a local path or an fsspec URL: `s3://bucket/set`, `gs://...`) of Parquet
files with fixed-shape columns, plus `shards.json`, written last: the set exists once its index
does. A sample is what the head's dataset yields (nested dicts, tuples and lists of tensors, arrays,
text and numbers, one column per leaf) or, when the recipe sets `data.cache`, the cached encoder
outputs of `icd data cache`. The writer stores the samples in a seeded random order, so each shard
is a fair mixture of the whole set.

Training streams the set through `datasets` (`load_dataset("parquet", streaming=True)`): each epoch
permutes the shard order (seed, epoch), `split_dataset_by_node` gives every process its own shards,
and a shuffle buffer of one shard's worth of samples is permuted before it is drawn from. The buffer
is filled and drawn block by block (not `datasets`' rolling buffer, whose content a checkpoint would
lose), so the stream's position is three small numbers: the reader's state at the start of the
current block, the block's index and the samples already drawn from it. The trainer keeps that in
the checkpoint, and a resumed run draws exactly the samples the killed one would have drawn.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import torch
from accelerate.utils import send_to_device
from rich.progress import track

from ..errors import UserError
from .cache import features_of, load_cache

INDEX = "shards.json"
SHARD_BYTES = 256 * 2**20  # default shard size: about 256 MiB of samples (also the shuffle buffer)
MAX_SAMPLES_PER_SHARD = 1000


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise UserError(f"cannot open {url}: {err}: install the filesystem package it names (s3fs, gcsfs, ...) or check the URL") from None


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


# ----------------------------------------------------------------------------- sample <-> columns


def flatten(sample: Any, prefix: str = "") -> tuple[dict[str, Any], Any]:
    """One column per leaf of a sample, and its layout: how `rebuild` puts the sample back together."""
    if isinstance(sample, dict):
        columns, layout = {}, {}
        for key, value in sample.items():
            if not isinstance(key, str):
                raise UserError(f"a training sample has the key {key!r}: shards need text keys")
            leaf_columns, layout[key] = flatten(value, f"{prefix}{key}.")
            columns |= leaf_columns
        return columns, {"dict": layout}
    if isinstance(sample, (tuple, list)):
        columns, layout = {}, []
        for i, value in enumerate(sample):
            leaf_columns, leaf_layout = flatten(value, f"{prefix}{i}.")
            columns |= leaf_columns
            layout.append(leaf_layout)
        return columns, {type(sample).__name__: layout}
    name = prefix[:-1] or "value"
    if isinstance(sample, torch.Tensor):
        return {name: sample.cpu().numpy()}, {"tensor": name}
    if isinstance(sample, np.ndarray):
        return {name: sample}, {"array": name}
    if isinstance(sample, (str, bool, int, float)):
        return {name: sample}, {type(sample).__name__: name}
    raise UserError(f"the training sample's field {name!r} is a {type(sample).__name__}: shards hold tensors, arrays, text and numbers")


def rebuild(layout: Any, block: dict[str, Any], row: int) -> Any:
    """Sample `row` of a block of columns (numpy-formatted), in the structure `flatten` recorded."""
    (kind, inner), = layout.items()
    if kind == "dict":
        return {key: rebuild(value, block, row) for key, value in inner.items()}
    if kind in ("tuple", "list"):
        values = [rebuild(value, block, row) for value in inner]
        return tuple(values) if kind == "tuple" else values
    value = block[inner][row]
    if kind == "tensor":
        return torch.from_numpy(np.array(value))  # a copy: the block's arrays are read-only
    if kind == "array":
        return np.array(value)
    return {"str": str, "bool": bool, "int": int, "float": float}[kind](value)


def _features(columns: dict[str, Any]):
    import datasets

    arrays = {key: value for key, value in columns.items() if isinstance(value, np.ndarray)}
    if any(value.ndim > 5 for value in arrays.values()):
        raise UserError("a training sample holds an array of more than 5 dimensions: shards hold up to 5")
    scalars = {str: "string", bool: "bool", int: "int64", float: "float64"}
    features = dict(features_of(arrays))
    features |= {key: datasets.Value(scalars[type(value)]) for key, value in columns.items() if key not in arrays}
    return datasets.Features({key: features[key] for key in columns})


def _shapes(columns: dict[str, Any]) -> dict[str, tuple]:
    return {key: value.shape for key, value in columns.items() if isinstance(value, np.ndarray)}


# ----------------------------------------------------------------------------- writing


def write_shards(head, out: str, samples_per_shard: int | None = None) -> int:
    """Write the recipe's training samples (or its `data.cache`) as a shard set at `out`; returns the count."""
    import datasets

    recipe = head.recipe
    if recipe.data.shards:
        raise UserError(f"recipe {recipe.name} already trains from shards ({recipe.data.shards}): remove data.shards to write its samples")
    fs, root = _filesystem(out)
    if fs.exists(root) and fs.ls(root):
        raise UserError(f"{out} already holds files: choose a new folder for the shards (or delete it)")
    if recipe.data.cache:
        dataset = load_cache(recipe.data.cache, head)
    else:
        head.build()
        dataset = head.train_dataset()
    order = np.random.default_rng(recipe.seed).permutation(len(dataset))  # each shard a mixture of the whole set
    first_columns, layout = flatten(dataset[int(order[0])])
    features, shapes = _features(first_columns), _shapes(first_columns)
    if samples_per_shard is None:
        sample_bytes = sum(value.nbytes if isinstance(value, np.ndarray) else 8 for value in first_columns.values())
        samples_per_shard = max(1, min(MAX_SAMPLES_PER_SHARD, SHARD_BYTES // sample_bytes))

    datasets.disable_progress_bars()
    fs.makedirs(root, exist_ok=True)
    shards, rows = [], []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.parquet"
        datasets.Dataset.from_list(rows, features=features).to_parquet(_join(out, name))
        shards.append({"file": name, "samples": len(rows)})
        rows.clear()

    for index in track(order, description="writing shards", total=len(order)):
        columns, sample_layout = flatten(dataset[int(index)])
        if sample_layout != layout or _shapes(columns) != shapes:
            raise UserError(f"training sample {index} differs in structure or shape from sample {order[0]} "
                            f"({_shapes(columns)} vs {shapes}): shards hold fixed-shape samples; give the recipe one data.size")
        rows.append(columns)
        if len(rows) == samples_per_shard:
            flush()
    if rows:
        flush()
    index = {"format": "parquet", "head": recipe.head, "recipe": recipe.name, "backbone": recipe.backbone, "size": recipe.data.size,
             "from_cache": bool(recipe.data.cache), "samples": len(order), "samples_per_shard": samples_per_shard,
             "layout": layout, "shards": shards}
    with fs.open(_join(root, INDEX), "w") as f:  # last: the set exists once its index does
        f.write(json.dumps(index, indent=1))
    return len(order)


# ----------------------------------------------------------------------------- reading


def read_index(url: str, recipe) -> dict:
    """The index of the shard set at `url`, checked against the recipe that trains from it."""
    fs, root = _filesystem(url)
    path = _join(root, INDEX)
    if not fs.isfile(path):
        raise UserError(f"{url} is not a shard set (no {INDEX}): write one with `icd data shard --recipe {recipe.name} --out {url}`")
    with fs.open(path) as f:
        index = json.load(f)
    written = (index["head"], index["backbone"], index["size"])
    if written != (recipe.head, recipe.backbone, recipe.data.size):
        raise UserError(
            f"the shards at {url} were written for head {written[0]}, backbone {written[1]}, size {written[2]}, "
            f"but the recipe asks for {recipe.head}, {recipe.backbone}, {recipe.data.size}: write shards for this recipe"
        )
    return index


def fewest_samples_per_process(index: dict, world_size: int) -> int:
    """The smallest epoch any process can get: `split_dataset_by_node` gives whole shards when their
    count divides by the processes, else every process keeps every world_size-th sample."""
    counts = sorted(shard["samples"] for shard in index["shards"])
    if len(counts) % world_size == 0:
        return sum(counts[: len(counts) // world_size])
    return index["samples"] // world_size


class ShardStream:
    """This process's share of a shard set, as collated batches on `device`: shuffled, in full
    batches, one epoch per iteration; `state_dict` / `load_state_dict` resume it exactly."""

    def __init__(self, url: str, head, rank: int, world_size: int, device: torch.device):
        recipe = head.recipe
        if recipe.data.cache:
            raise UserError("data.shards and data.cache are two sources of training samples: keep one")
        if recipe.data.num_workers:
            raise UserError("data.shards streams in the training process (so a resume is exact): set data.num_workers=0")
        self.url, self.head, self.rank, self.world_size, self.device = url, head, rank, world_size, device
        self.index = read_index(url, recipe)
        self.seed, self.batch_size = recipe.seed, recipe.train.batch_size  # batch_size: also read by accelerate under DeepSpeed
        self.buffer_size = self.index["samples_per_shard"]
        fewest = fewest_samples_per_process(self.index, world_size)
        if fewest < self.batch_size:
            raise UserError(f"the shards at {url} give a process {fewest} samples per epoch, fewer than one batch ({self.batch_size}) "
                            f"on {world_size} processes: lower train.batch_size or write more samples")
        self.epoch = 0
        self.position = {"block": 0, "reader": None, "drawn": 0}  # where the next sample comes from

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, {"block": 0, "reader": None, "drawn": 0}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "world_size": self.world_size, **self.position}

    def load_state_dict(self, states: list[dict] | None) -> None:
        """Restore this process's entry of `states` (one per process, as the trainer gathered them)."""
        if states is None:
            raise UserError("the checkpoint was not written by a run that trains from data.shards: resume it with its own data source")
        if len(states) != self.world_size:
            raise UserError(f"the checkpoint streamed its shards on {len(states)} processes and this run has {self.world_size}: "
                            f"resume on {len(states)} (each process's share of the shards depends on the count)")
        state = states[self.rank]
        self.epoch = state["epoch"]
        self.position = {key: state[key] for key in ("block", "reader", "drawn")}

    def _reader(self):
        """This epoch's samples for this process, in blocks of `buffer_size` rows (numpy columns)."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        files = [_join(self.url, shard["file"]) for shard in self.index["shards"]]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(files))  # the same on every process
        stream = datasets.load_dataset("parquet", data_files=[files[i] for i in order], split="train", streaming=True)
        return split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size).with_format("numpy")

    def __iter__(self) -> Iterator[Any]:
        reader = self._reader()
        restored = self.position["reader"]
        if restored is not None:
            reader.load_state_dict(restored)
        blocks = reader.iter(batch_size=self.buffer_size)
        block_index, drawn = self.position["block"], self.position["drawn"]
        samples = []
        while True:
            # The reader's state before the block is read (a resume reads it again); right after
            # load_state_dict the reader reports its initial state, so the restored one is kept.
            reader_state, restored = restored or reader.state_dict(), None
            block = next(blocks, None)
            if block is None:
                return  # the epoch's last partial batch is dropped, as the map-style loader does
            rows = len(next(iter(block.values())))
            order = np.random.default_rng([self.seed, self.epoch, self.rank, block_index]).permutation(rows)
            for row in order[drawn:]:
                samples.append(rebuild(self.index["layout"], block, int(row)))
                drawn += 1
                if len(samples) == self.batch_size:
                    self.position = {"block": block_index, "reader": reader_state, "drawn": drawn}
                    yield send_to_device(self.head.collate(samples), self.device)
                    samples = []
            block_index, drawn = block_index + 1, 0
