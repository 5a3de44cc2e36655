"""In-context triplets from synthetic scene families, and the tensors the model trains on.

A synthetic triplet takes a family of two scenes (the same objects recoloured or moved, see
`synthscenes.scene_family`): the example pair comes from the first scene, the query and the target
from the second, the way the paper draws the example from `_0` and the query from `_1` of one
InstructPix2Pix folder. Maps are the scenes' exact ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.annotators import synthetic_map
from ...data.synthscenes import FAMILY_CHANGES, Scene, scene_family
from ...errors import UserError
from ...recipes import TaskCard

HELD_OUT_SEED = 1_000_000  # evaluation scenes start here; training uses small seeds
IMAGE_KEYS = ("example_source", "example_target", "query", "target")


def synthetic_triplet(scene_seed: int, task: TaskCard, size: int, change: str) -> dict:
    """The triplet of one task on the scene family of `scene_seed` (HxWx3 uint8 images and a caption:
    the task's fixed text for forward tasks, the query scene's caption otherwise)."""
    example, query = scene_family(scene_seed, 2, size, change)
    return triplet_from_scenes(example, query, task)


def triplet_from_scenes(example: Scene, query: Scene, task: TaskCard) -> dict:
    """The triplet of one task: the example pair from `example`, the query and target from `query`."""
    return {
        "example_source": synthetic_map(example, task.source),
        "example_target": synthetic_map(example, task.target),
        "query": synthetic_map(query, task.source),
        "target": synthetic_map(query, task.target),
        "caption": task_text(task, query.caption),
        "task": task.name,
    }


class SyntheticTriplets(torch.utils.data.Dataset):
    """n triplets; item i uses the family of scene `seed + i`, a task drawn uniformly and a family
    change (recolour or move) drawn uniformly, both from (seed, i) alone."""

    def __init__(self, n: int, tasks: list[TaskCard], size: int = 64, seed: int = 0):
        self.n, self.tasks, self.size, self.seed = n, tasks, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} triplets")  # also ends iteration
        rng = np.random.default_rng([self.seed, index])
        task = self.tasks[rng.integers(len(self.tasks))]
        change = FAMILY_CHANGES[rng.integers(len(FAMILY_CHANGES))]
        return synthetic_triplet(self.seed + index, task, self.size, change)


def task_text(task: TaskCard, caption: str) -> str:
    """The text of a triplet: the task's fixed text (forward tasks, e.g. "depth map"), else the caption."""
    return caption if task.text is None else task.text


def with_task_texts(tasks: list[TaskCard], texts: dict[str, str]) -> list[TaskCard]:
    """The task cards with the fixed texts a recipe sets (`model.task_texts`, task name -> text)."""
    unknown = sorted(set(texts) - {task.name for task in tasks})
    if unknown:
        raise UserError(f"model.task_texts names {', '.join(unknown)}, which the recipe does not train: use names from its tasks list")
    return [task.model_copy(update={"text": texts[task.name]}) if task.name in texts else task for task in tasks]


def to_model_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1


def as_tensors(triplet: dict) -> dict:
    """A triplet with its images as [-1, 1] tensors (what the data loader yields)."""
    return {**triplet, **{key: to_model_tensor(triplet[key]) for key in IMAGE_KEYS}}
