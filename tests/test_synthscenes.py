import math
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from incontext_diffusion.data import synthscenes
from incontext_diffusion.data.synthscenes import (
    CLASSES, COLOURS, SHAPES, SIZES, WALL_Z, Camera, SceneObject, SynthScenesDataset,
    caption_vocabulary, render_objects, render_scene, scene_family, scene_grid, write_dataset)
from incontext_diffusion.errors import UserError

ARRAY_FIELDS = ("rgb", "depth", "semantic", "instances", "edges", "normals")


def pixel_coords(camera: Camera, size: int) -> np.ndarray:
    """Pinhole coordinates of pixel centres, in units of focal length (written out independently)."""
    focal = (size / 2) / math.tan(math.radians(camera.fov_degrees) / 2)
    return (np.arange(size) + 0.5 - size / 2) / focal


def image_x(obj: SceneObject, camera: Camera) -> float:
    """Horizontal image coordinate of an object's centre: yaw then pitch as rotation matrices."""
    cy, sy, cp, sp = math.cos(camera.yaw), math.sin(camera.yaw), math.cos(camera.pitch), math.sin(camera.pitch)
    yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    pitch_down = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    world_from_camera = yaw @ pitch_down @ np.diag([1.0, -1.0, 1.0])  # camera y points down
    x, _, z = world_from_camera.T @ (np.array(obj.position) - np.array(camera.position))
    return x / z


def resolve(text: str, objects: list[SceneObject], camera: Camera) -> list[int]:
    """A small independent reader of the referring grammar: the indices the text fits."""
    def fits(words: list[str]) -> list[int]:
        return [k for k, obj in enumerate(objects) if all(w in (obj.size, obj.colour, obj.shape) for w in words)]

    words = text.split()
    assert words[0] == "the", text
    xs = [image_x(obj, camera) for obj in objects]
    if words[1] in ("leftmost", "rightmost"):
        candidates = fits(words[2:])
        pick = min if words[1] == "leftmost" else max
        return [pick(candidates, key=lambda k: xs[k])]
    if "of" in words:
        side = words.index("of") - 1
        anchors = fits(words[side + 3:])
        assert len(anchors) == 1, f"anchor of {text!r} is ambiguous"
        (anchor,) = anchors
        sign = -1 if words[side] == "left" else 1
        return [k for k in fits(words[1:side]) if sign * (xs[k] - xs[anchor]) > 0]
    return fits(words[1:])


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def test_same_seed_gives_the_same_scene_bit_for_bit():
    first, second, other = render_scene(11, 48, 1, 5), render_scene(11, 48, 1, 5), render_scene(12, 48, 1, 5)
    for field in ARRAY_FIELDS:
        a, b = getattr(first, field), getattr(second, field)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
    assert (first.caption, first.objects, first.boxes) == (second.caption, second.objects, second.boxes)
    assert [(r.text, r.object_index, r.box, r.mask.tobytes()) for r in first.referring] == \
        [(r.text, r.object_index, r.box, r.mask.tobytes()) for r in second.referring]
    assert not np.array_equal(first.rgb, other.rgb)


def test_layout_does_not_depend_on_resolution():
    small, large = render_scene(5, 32, 1, 4), render_scene(5, 96, 1, 4)
    assert small.objects == large.objects and small.camera == large.camera
    assert small.caption == large.caption


def test_depth_and_normal_of_a_sphere_straight_ahead():
    camera = Camera(position=(0.0, 1.0, 0.0))
    sphere = SceneObject("sphere", "red", "large", (0.0, 1.0, 3.0), 0.5)
    scene = render_objects([sphere], camera, 33)  # odd size: pixel 16 lies on the optical axis
    assert abs(scene.depth[16, 16] - 2.5) < 1e-4
    np.testing.assert_allclose(scene.normals[16, 16], [0.0, 0.0, -1.0], atol=1e-5)
    # Off-axis, z-depth is the ray parameter of o + t * (x, y, 1): solve the quadratic here.
    coords = pixel_coords(camera, 33)
    for row, col in [(16, 19), (13, 18), (18, 14)]:
        ray = np.array([coords[col], -coords[row], 1.0])  # world y is up, image rows go down
        offset = np.array(camera.position) - np.array(sphere.position)
        a, b, c = ray @ ray, 2 * ray @ offset, offset @ offset - sphere.radius**2
        t = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
        assert scene.instances[row, col] == 1
        assert abs(scene.depth[row, col] - t) < 1e-4


def test_floor_and_wall_depth_match_the_planes():
    camera = Camera(position=(0.2, 1.4, 0.1), yaw=0.1, pitch=0.3)
    scene = render_objects([], camera, 32)
    coords = pixel_coords(camera, 32)
    cy, sy, cp, sp = math.cos(camera.yaw), math.sin(camera.yaw), math.cos(camera.pitch), math.sin(camera.pitch)
    # Bottom row sees the floor: the ray's downward speed is y cos(pitch) + sin(pitch) per unit z-depth.
    assert np.all(scene.semantic[-1] == CLASSES.index("floor"))
    np.testing.assert_allclose(scene.depth[-1], 1.4 / (coords[-1] * cp + sp), rtol=1e-6)
    # Top row sees the wall.
    assert np.all(scene.semantic[0] == CLASSES.index("wall"))
    forward_speed = -coords * sy - coords[0] * cy * sp + cy * cp
    np.testing.assert_allclose(scene.depth[0], (WALL_Z - 0.1) / forward_speed, rtol=1e-6)
    assert scene.caption == "" and scene.referring == []


def test_every_referring_expression_names_exactly_one_visible_object():
    forms, hidden = set(), 0
    for seed in range(200):
        scene = render_scene(seed, 32, 1, 5)
        alone = [int((render_objects([obj], scene.camera, 32).instances == 1).sum()) for obj in scene.objects]
        visible = [int((scene.instances == k + 1).sum()) for k in range(len(scene.objects))]
        hidden += sum(v < 0.6 * a for v, a in zip(visible, alone))
        for ref in scene.referring:
            assert resolve(ref.text, scene.objects, scene.camera) == [ref.object_index], (seed, ref.text)
            k = ref.object_index
            assert visible[k] >= 0.6 * alone[k], (seed, ref.text)
            assert ref.mask.dtype == bool and np.array_equal(ref.mask, scene.instances == k + 1)
            assert ref.box == bounding_box(ref.mask) == scene.boxes[k]
            forms.add("of" if " of " in ref.text else ref.text.split()[1] if "most" in ref.text else "attributes")
    assert forms == {"attributes", "leftmost", "rightmost", "of"}
    assert hidden > 0  # the hidden-object rule was exercised


def test_maps_are_consistent():
    for seed in range(20):
        scene = render_scene(seed, 48, 1, 5)
        assert scene.rgb.shape == (48, 48, 3) and scene.rgb.dtype == np.uint8
        assert scene.depth.dtype == np.float32 and np.all(np.isfinite(scene.depth)) and np.all(scene.depth > 0)
        assert set(np.unique(scene.semantic[scene.instances == 0])) <= {0, 1}
        for k, obj in enumerate(scene.objects):
            mask = scene.instances == k + 1
            assert mask.any(), "every object is at least partly visible"
            assert np.all(scene.semantic[mask] == CLASSES.index(obj.shape))
            assert scene.boxes[k] == bounding_box(mask)
            # Edges are strong on the object's outline.
            inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
            outline = mask.copy()
            outline[1:-1, 1:-1] &= ~inner
            assert scene.edges[outline].mean() > 150
        assert np.median(scene.edges) < 50
        lengths = np.linalg.norm(scene.normals, axis=-1)
        np.testing.assert_allclose(lengths, 1.0, atol=1e-5)
        coords = pixel_coords(scene.camera, 48)
        rays = np.stack(np.broadcast_arrays(coords[None, :], coords[:, None], 1.0), axis=-1)
        assert np.all((scene.normals * rays).sum(axis=-1) < 0), "normals face the camera"


def test_edges_follow_creases_and_corners():
    cube = SceneObject("cube", "blue", "large", (0.0, 0.45, 3.5), 0.45, angle=0.5)
    scene = render_objects([cube], Camera((0.0, 1.6, 0.0), pitch=0.35), 64)
    # Pixels of the cube whose right neighbour lies on another face of the cube.
    same_cube = (scene.instances[:, 1:] == 1) & (scene.instances[:, :-1] == 1)
    crease = same_cube & ((scene.normals[:, 1:] * scene.normals[:, :-1]).sum(axis=-1) < 0.5)
    assert crease.sum() > 5 and scene.edges[:, 1:][crease].min() > 150
    # The floor-wall corner is an edge, the open floor and wall are not.
    corner = np.flatnonzero(np.diff(scene.semantic[:, 0].astype(int)))
    assert len(corner) == 1 and scene.edges[corner[0], :5].min() > 150
    assert scene.edges[-4:].max() == 0 and scene.edges[:4].max() == 0


def test_objects_rest_on_the_floor_apart_from_each_other():
    for seed in range(50):
        objects = render_scene(seed, 16, 1, 6).objects
        for i, a in enumerate(objects):
            assert a.position[1] == a.radius
            for b in objects[i + 1:]:
                reach = sum(o.radius * (math.sqrt(2) if o.shape == "cube" else 1) for o in (a, b))
                assert math.dist(a.position[::2], b.position[::2]) > reach


def test_caption_grammar_and_vocabulary():
    vocabulary = set(caption_vocabulary())
    part = f"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    for seed in range(50):
        scene = render_scene(seed, 16, 1, 4)
        assert re.fullmatch(f"{part}( and {part})*", scene.caption), scene.caption
        parts = scene.caption.split(" and ")
        ordered = sorted(scene.objects, key=lambda obj: image_x(obj, scene.camera))
        assert parts == [f"a {o.size} {o.colour} {o.shape}" for o in ordered]
        for text in [scene.caption] + [r.text for r in scene.referring]:
            assert set(text.split()) <= vocabulary
    assert render_objects([SceneObject("sphere", "red", "large", (0.0, 0.45, 4.0), 0.45)],
                          Camera((0.0, 1.6, 0.0), pitch=0.35), 32).caption == "a large red sphere"


def test_scene_families():
    base = render_scene(9, 32)
    recoloured = scene_family(9, 3, 32, change="colour")
    assert len(recoloured) == 3 and np.array_equal(recoloured[0].rgb, base.rgb)
    for scene in recoloured[1:]:
        assert [o.position for o in scene.objects] == [o.position for o in base.objects]
        assert all(o.colour != b.colour for o, b in zip(scene.objects, base.objects))
        assert np.array_equal(scene.instances, base.instances)
    moved = scene_family(9, 3, 32, change="layout")
    for scene in moved[1:]:
        assert [(o.shape, o.colour, o.size) for o in scene.objects] == \
            [(o.shape, o.colour, o.size) for o in base.objects]
        assert [o.position for o in scene.objects] != [o.position for o in base.objects]
    again = scene_family(9, 3, 32, change="layout")
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(moved, again))


def test_torch_dataset_renders_seed_plus_index():
    dataset = SynthScenesDataset(3, size=32, seed=100)
    assert len(dataset) == 3
    assert np.array_equal(dataset[2].rgb, render_scene(102, 32).rgb)
    with pytest.raises(IndexError):
        dataset[3]


def test_written_dataset_loads_as_imagefolder(tmp_path):
    out = write_dataset(tmp_path / "scenes", n=4, size=32, seed=20, progress=False)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == 4
    for column in ("image", "depth", "semantic", "instances", "edges", "normals"):
        assert isinstance(loaded.features[column], datasets.Image), column
    for row in loaded:
        scene = render_scene(row["seed"], 32)
        assert row["text"] == scene.caption
        assert [r["text"] for r in row["referring"]] == [r.text for r in scene.referring]
        assert np.array_equal(np.array(row["image"]), scene.rgb)
        depth_mm = np.array(row["depth"]).astype(np.int64)
        assert np.array_equal(depth_mm, np.round(scene.depth * 1000).astype(np.int64))
        assert np.array_equal(np.array(row["semantic"]), scene.semantic)
        assert np.array_equal(np.array(row["instances"]), scene.instances)
        normals = np.array(row["normals"]).astype(np.float32) / 255 * 2 - 1
        np.testing.assert_allclose(normals, scene.normals, atol=1 / 255 + 1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "scenes"]  # no partial folder left


def test_scene_grid_shows_every_map(tmp_path):
    path = scene_grid(seeds=range(2), size=32, path=tmp_path / "grid" / "scenes.png")
    grid = np.array(Image.open(path))
    assert grid.shape == (64, 6 * 32, 3)
    assert np.array_equal(grid[32:, :32], render_scene(1, 32).rgb)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real_render = synthscenes.render_scene

    def failing_render(seed, *args):
        if seed == 2:
            raise KeyboardInterrupt
        return real_render(seed, *args)

    monkeypatch.setattr(synthscenes, "render_scene", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "scenes", n=4, size=16, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise_user_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        write_dataset(tmp_path / "full", n=2, size=16, progress=False)
    with pytest.raises(UserError, match="at least 1"):
        write_dataset(tmp_path / "out", n=0)
    with pytest.raises(UserError, match="at least 16"):
        write_dataset(tmp_path / "out", n=2, size=8)
    with pytest.raises(UserError, match="at least 16"):
        render_scene(0, size=15)
    with pytest.raises(UserError, match="seed must be"):
        render_scene(-1)
    with pytest.raises(UserError, match="object counts"):
        render_scene(0, min_objects=3, max_objects=2)
    with pytest.raises(UserError, match="unknown change"):
        scene_family(0, 2, change="style")
    with pytest.raises(UserError, match="at least 1"):
        SynthScenesDataset(0)
    with pytest.raises(UserError, match="at least 1"):
        scene_family(0, 0)
    assert not (tmp_path / "out").exists()
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert write_dataset(tmp_path / "empty", n=1, size=16, progress=False) == tmp_path / "empty"
