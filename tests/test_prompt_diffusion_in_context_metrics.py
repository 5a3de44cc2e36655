"""In-context metrics on hand-made cases: the ground truth passes, a copy of the example's target
follows the task but not the query, a constant follows neither the query nor (usually) the task."""

import numpy as np
import pytest

from incontext_diffusion.data.annotators import synthetic_map
from incontext_diffusion.data.synthscenes import scene_family
from incontext_diffusion.metrics.in_context import (
    background_colours,
    closest,
    confusion_matrix,
    follows_query,
    follows_task,
    mask_iou,
    nearest_colour,
    non_background_mask,
    object_colour_agreement,
    rmse,
)

SEEDS = range(1_000_000, 1_000_006)
TARGETS = ("image", "depth", "hed", "seg")  # the ground truths of the eight tasks, by modality


def families(change="layout", size=32):
    return [scene_family(seed, 2, size, change) for seed in SEEDS]


def candidates(scene, source):
    """The task-following candidates of a query scene for a task whose query is `source`."""
    return {m: synthetic_map(scene, m) for m in dict.fromkeys([*TARGETS, source])}


def test_rmse_is_on_pixels_over_255():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 51, np.uint8)  # 51 / 255 = 0.2 everywhere
    assert rmse(a, b) == pytest.approx(0.2)
    b[0, 0] = 255  # one pixel of four at 1.0: sqrt((3 * 0.04 + 1) / 4)
    assert rmse(a, b) == pytest.approx(np.sqrt((3 * 0.04 + 1) / 4))
    with pytest.raises(ValueError, match="different shapes"):
        rmse(a, np.zeros((3, 2, 3), np.uint8))


def test_follows_task_needs_strictly_the_nearest_candidate():
    black, grey, white = (np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 255))
    found = {"depth": black, "image": white}
    assert follows_task(grey, "depth", found) and not follows_task(grey, "image", found)
    assert closest(grey, found) == "depth"
    assert not follows_task(grey, "depth", {"depth": black, "hed": black.copy()})  # a tie is not following
    with pytest.raises(ValueError, match="seg"):
        follows_task(grey, "seg", found)


@pytest.mark.parametrize("task", [("image", "depth"), ("image", "hed"), ("image", "seg"), ("depth", "image"),
                                  ("hed", "image"), ("seg", "image"), ("canny", "image"), ("normal", "image")])
def test_the_ground_truth_follows_task_and_query(task):
    source, target = task
    scenes = families()
    for (_, query), (_, other) in zip(scenes, scenes[1:] + scenes[:1]):
        truth, other_truth = synthetic_map(query, target), synthetic_map(other, target)
        assert follows_task(truth, target, candidates(query, source))
        assert follows_query(truth, other_truth, truth, other_truth)


@pytest.mark.parametrize("target", ["depth", "hed", "seg"])
def test_copying_the_example_follows_the_task_but_never_the_query(target):
    scenes = families()
    for (example, query), (_, other) in zip(scenes, scenes[1:] + scenes[:1]):
        copy = synthetic_map(example, target)  # the same image whatever the query
        assert follows_task(copy, target, candidates(query, "image"))
        assert not follows_query(copy, copy, synthetic_map(query, target), synthetic_map(other, target))


def test_a_constant_map_fails_query_following():
    scenes = families()
    truths = [synthetic_map(query, "depth") for _, query in scenes]
    mean = np.round(np.mean(truths, axis=0)).astype(np.uint8)
    for truth, other in zip(truths, truths[1:] + truths[:1]):
        assert not follows_query(mean, mean, truth, other)


def test_confusion_matrix_rows_are_fractions_of_each_task():
    rows = ["image_to_depth", "image_to_depth", "image_to_depth", "image_to_depth", "depth_to_image"]
    nearest = ["depth", "depth", "depth", "image", "image"]
    matrix = confusion_matrix(rows, nearest, ["image_to_depth", "depth_to_image", "hed_to_image"], ["image", "depth"])
    np.testing.assert_allclose(matrix, [[0.25, 0.75], [1.0, 0.0], [0.0, 0.0]])


def test_object_colours_are_read_through_the_shading():
    assert nearest_colour(np.array([220, 30, 30]) * 0.45) == "red"  # the darkest shade the renderer makes
    assert nearest_colour([245 * 0.7, 135 * 0.7, 20 * 0.7]) == "orange"
    for example, query in families():
        colours = [obj.colour for obj in query.objects]
        assert all(object_colour_agreement(query.rgb, query.instances, colours))
    for example, recoloured in families("colour"):  # same layout, every object another colour
        assert not any(object_colour_agreement(example.rgb, recoloured.instances, [o.colour for o in recoloured.objects]))


def test_background_is_the_shaded_floor_and_wall_and_objects_are_not():
    # LIGHT = (-0.4, 1, -0.5) / 1.1874: the floor gets 0.45 + 0.55 * 0.8422 = 0.9132 of (140, 140, 140),
    # the wall 0.45 + 0.55 * 0.4211 = 0.6816 of (225, 212, 185).
    np.testing.assert_array_equal(background_colours(), [[128, 128, 128], [153, 144, 126]])
    for _, query in families(size=48):
        assert (query.rgb[query.semantic == 0] == [128, 128, 128]).all() and (query.rgb[query.semantic == 1] == [153, 144, 126]).all()
        objects = query.instances > 0
        assert mask_iou(non_background_mask(query.rgb), objects) == 1.0
    floor_only = np.full((4, 4, 3), 128, np.uint8)
    assert not non_background_mask(floor_only).any()


def test_mask_iou_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(a, a) == 1.0 and mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
