"""In-context metrics (Prompt Diffusion on synthetic scene families): does the output follow the
task the example pair shows, and the content of the query?

Images are HxWx3 uint8 arrays; distances are RMSE on pixels / 255 (`rmse`).

- **Task following**: an output follows its task when it is closer to the query's ground truth for
  that task than to the query's ground truth for every other task and to the query image itself
  (`closest`, `follows_task`); `confusion_matrix` counts, per example-pair task, what the outputs
  are closest to.
- **Query following**: with one example pair and two queries a and b, the output for a is closer to
  a's ground truth than to b's, and the output for b closer to b's than to a's
  (`follows_query`). An output that ignores the query (a constant, or a copy of the example's
  target) gives the same image for both, so it can pass at most one of the two sides.
- **Object colour** (inverse tasks): the mean colour of the output inside each object's
  ground-truth mask is nearest, in chromaticity, to the object's own palette colour
  (`object_colour_agreement`). Shading scales a surface's RGB, so chromaticity r, g, b / (r + g + b)
  is the colour without its light.
- **Object placement** (unseen tasks): the IoU of the output's non-background pixels (far from the
  shaded floor and wall colours, which are constant on the flat room) with the query's object mask
  (`non_background_mask`, `mask_iou`).
"""

from __future__ import annotations

import numpy as np

from ..data.synthscenes import AMBIENT, COLOURS, FLOOR_RGB, LIGHT, WALL_RGB

BACKGROUND_TOLERANCE = 40.0  # RGB distance (0..441) within which a pixel counts as floor or wall


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """RMSE between two HxWx3 uint8 images, on pixels / 255."""
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}: resize one to the other")
    return float(np.sqrt(np.mean(((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2)))


def closest(output: np.ndarray, candidates: dict[str, np.ndarray]) -> str:
    """The name of the candidate image nearest to `output` (ties: the first in order)."""
    distances = {name: rmse(output, image) for name, image in candidates.items()}
    return min(distances, key=distances.get)


def follows_task(output: np.ndarray, expected: str, candidates: dict[str, np.ndarray]) -> bool:
    """`output` is strictly closer to `candidates[expected]` than to every other candidate.

    For the task following test the candidates are the query scene's ground truth of every task
    (keyed by modality: image, depth, hed, seg) and the query image itself (its modality).
    """
    if expected not in candidates:
        raise ValueError(f"the expected candidate {expected!r} is not among {sorted(candidates)}")
    own = rmse(output, candidates[expected])
    return all(own < rmse(output, image) for name, image in candidates.items() if name != expected)


def follows_query(output_a: np.ndarray, output_b: np.ndarray, truth_a: np.ndarray, truth_b: np.ndarray) -> bool:
    """Outputs of one example pair for queries a and b: each is closer to its own query's ground truth."""
    return rmse(output_a, truth_a) < rmse(output_a, truth_b) and rmse(output_b, truth_b) < rmse(output_b, truth_a)


def confusion_matrix(rows: list[str], nearest: list[str], row_names: list[str], column_names: list[str]) -> np.ndarray:
    """Fractions (len(row_names), len(column_names)): per row name (the example pair's task), the
    share of its outputs nearest to each column (a modality). Each row with outputs sums to 1."""
    counts = np.zeros((len(row_names), len(column_names)))
    for row, column in zip(rows, nearest, strict=True):
        counts[row_names.index(row), column_names.index(column)] += 1
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def chromaticity(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colours -> r, g, b / (r + g + b), unchanged by shading."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / np.maximum(rgb.sum(axis=-1, keepdims=True), 1e-6)


PALETTE_NAMES = list(COLOURS)
PALETTE_CHROMATICITY = chromaticity(np.array([COLOURS[name] for name in PALETTE_NAMES]))


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour (synthscenes.COLOURS) whose chromaticity is nearest to `rgb`."""
    distances = np.linalg.norm(PALETTE_CHROMATICITY - chromaticity(rgb), axis=-1)
    return PALETTE_NAMES[int(distances.argmin())]


def object_colour_agreement(output: np.ndarray, instances: np.ndarray, colours: list[str]) -> list[bool]:
    """Per object k (mask `instances == k + 1`, true colour `colours[k]`): the output's mean colour
    there is nearest to the object's colour. Objects with no pixel at this size are left out."""
    agreements = []
    for k, colour in enumerate(colours):
        mask = instances == k + 1
        if mask.any():
            agreements.append(nearest_colour(output[mask].mean(axis=0)) == colour)
    return agreements


def background_colours() -> np.ndarray:
    """The floor's and the wall's RGB as the renderer shades them (flat, so one colour each)."""
    floor_light = AMBIENT + (1 - AMBIENT) * max(float(LIGHT[1]), 0.0)  # floor normal +y
    wall_light = AMBIENT + (1 - AMBIENT) * max(float(-LIGHT[2]), 0.0)  # wall normal -z
    return np.round(np.array([np.multiply(FLOOR_RGB, floor_light), np.multiply(WALL_RGB, wall_light)]))


def non_background_mask(image: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
    """(H, W) bool: pixels farther than `tolerance` (RGB distance) from both the floor and the wall colour."""
    distances = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - background_colours(), axis=-1)  # (H, W, 2)
    return distances.min(axis=-1) > tolerance


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
