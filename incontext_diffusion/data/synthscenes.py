"""Procedural 3D scenes with exact depth, segmentation, instances, boxes, edges, normals, captions
and referring expressions.

A scene is a grey floor (y = 0) and a beige back wall (z = WALL_Z) with 1 to MAX_OBJECTS objects
resting on the floor, seen by a pinhole camera about 1.6 m up, looking along +z and pitched down.
Every map is ray cast with numpy, one ray through each pixel centre, so each one is exact.

Conventions:
- world: metres, x right, y up, z forward (from the camera towards the wall);
- camera coordinates (used by `normals`): OpenCV style, x right, y down, z forward;
- depth: z-depth, the distance along the optical axis (not along the ray), float32 metres;
  `write_dataset` stores it as a 16-bit PNG in millimetres;
- semantic: ids into CLASSES (floor 0, wall 1, sphere 2, cube 3, cylinder 4);
- instances: 0 = floor or wall, k + 1 = objects[k];
- boxes: (x0, y0, x1, y1) in pixels, x1 and y1 exclusive, from the instance mask; (0, 0, 0, 0) for
  an object with no pixel at this resolution;
- normals: float32 unit vectors in camera coordinates, pointing towards the camera;
- edges: uint8 soft edge map (HED-like): instance and normal discontinuities, Gaussian blurred;
- caption: "a {size} {colour} {shape}" per object, joined with " and ", objects left to right;
- referring expressions: "the [size] [colour] {shape}", "the leftmost|rightmost {shape}",
  "the {shape} left|right of the [size] [colour] {shape}"; each names exactly one object among all
  objects of the scene, and never one that is mostly hidden.
The layout (camera and objects) depends only on the seed, never on the resolution.
"""

import json
import math
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from ..core.images import depth_to_uint16
from ..errors import UserError

CLASSES = ("floor", "wall", "sphere", "cube", "cylinder")
SHAPES = ("sphere", "cube", "cylinder")
SIZES = ("small", "large")
COLOURS: dict[str, tuple[int, int, int]] = {  # saturated hues, none close to the grey/beige room
    "red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (240, 215, 30), "green": (40, 170, 50),
    "cyan": (30, 200, 215), "blue": (35, 70, 225), "purple": (135, 45, 195), "pink": (255, 120, 190),
}
SIZE_RADIUS = {"small": 0.25, "large": 0.45}  # sphere and cylinder radius, cube half-extent (m)
FLOOR_RGB = (140, 140, 140)
WALL_RGB = (225, 212, 185)
WALL_Z = 6.5
LIGHT = np.array([-0.4, 1.0, -0.5]) / np.linalg.norm([-0.4, 1.0, -0.5])  # towards the light
AMBIENT = 0.45
MAX_OBJECTS = 6
LAYOUT_CHECK_SIZE = 32  # visibility is judged at this fixed resolution, so layouts ignore `size`
MIN_VISIBLE = 0.25  # every object shows at least this fraction of its silhouette
REFERABLE_VISIBLE = 0.6  # objects less visible than this count as hidden: never referred to
RELATION_MARGIN = 0.05  # left/right relations need this gap in image x (units of focal length)
FAMILY_CHANGES = ("colour", "layout")
# Attribute subsets tried, shortest first, to name an object uniquely.
ATTRIBUTE_CHOICES = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


@dataclass(frozen=True)
class SceneObject:
    """One object. `position` is its centre in world metres; `radius` is the sphere or cylinder
    radius or the cube half-extent (cylinders are 2 * radius tall); `angle` turns cubes about the
    vertical axis (radians)."""

    shape: str
    colour: str
    size: str
    position: tuple[float, float, float]
    radius: float
    angle: float = 0.0


@dataclass(frozen=True)
class Camera:
    """Pinhole camera with square pixels. `yaw` > 0 turns right, `pitch` > 0 looks down (radians)."""

    position: tuple[float, float, float]
    yaw: float = 0.0
    pitch: float = 0.0
    fov_degrees: float = 50.0

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World directions of the camera's x (right), y (down) and z (forward) axes."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        right = np.array([cy, 0.0, -sy])
        down = np.array([-sy * sp, -cp, -cy * sp])  # right x forward
        forward = np.array([sy * cp, -sp, cy * cp])
        return right, down, forward


@dataclass
class ReferringExpression:
    """A text naming exactly one object, with that object's index, mask and box."""

    text: str
    object_index: int
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    """One rendered scene: aligned maps at one resolution and the objects and texts about them."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray  # float32 (H, W), z-depth in metres
    semantic: np.ndarray  # uint8 (H, W), ids into CLASSES
    instances: np.ndarray  # uint8 (H, W), 0 = floor/wall, k + 1 = objects[k]
    boxes: list[tuple[int, int, int, int]]  # one per object
    edges: np.ndarray  # uint8 (H, W)
    normals: np.ndarray  # float32 (H, W, 3), camera coordinates
    caption: str
    objects: list[SceneObject]
    referring: list[ReferringExpression]
    camera: Camera
    visibility: list[float]  # visible fraction of each object's silhouette
    seed: int | None = None


def caption_vocabulary() -> list[str]:
    """Every word that captions and referring expressions can contain."""
    words = {"a", "and", "the", "leftmost", "rightmost", "left", "right", "of"}
    return sorted(words | set(SIZES) | set(COLOURS) | set(SHAPES))


# Ray casting. Rays are o + t * d with d's forward component 1, so t is the z-depth

def _camera_rays(camera: Camera, size: int) -> np.ndarray:
    right, down, forward = camera.axes()
    focal = size / 2 / math.tan(math.radians(camera.fov_degrees) / 2)
    coords = (np.arange(size) + 0.5 - size / 2) / focal
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    rays = xs[..., None] * right + ys[..., None] * down + forward
    return rays.reshape(-1, 3)


def _rotate_y(vectors: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    return np.stack([c * x + s * z, y, -s * x + c * z], axis=-1)


def _hit_plane(origin: np.ndarray, rays: np.ndarray, axis: int, value: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        t = (value - origin[axis]) / rays[:, axis]
    return np.where(t > 0, t, np.inf)


def _hit_sphere(origin: np.ndarray, rays: np.ndarray, obj: SceneObject) -> np.ndarray:
    offset = origin - np.asarray(obj.position)
    a = np.einsum("ij,ij->i", rays, rays)
    b = rays @ offset
    disc = b * b - a * (offset @ offset - obj.radius**2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _hit_cube(origin: np.ndarray, rays: np.ndarray, obj: SceneObject) -> np.ndarray:
    # Slab test in the cube's own frame.
    local_origin = _rotate_y(origin - np.asarray(obj.position), -obj.angle)
    local_rays = _rotate_y(rays, -obj.angle)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-obj.radius - local_origin) / local_rays
        t2 = (obj.radius - local_origin) / local_rays
    near = np.minimum(t1, t2).max(axis=1)
    far = np.maximum(t1, t2).min(axis=1)
    return np.where((near <= far) & (near > 0), near, np.inf)


def _hit_cylinder(origin: np.ndarray, rays: np.ndarray, obj: SceneObject) -> np.ndarray:
    # Vertical axis; side and both caps, the nearest wins.
    ox, oy, oz = origin - np.asarray(obj.position)
    dx, dy, dz = rays[:, 0], rays[:, 1], rays[:, 2]
    r = obj.radius
    a = dx * dx + dz * dz
    b = dx * ox + dz * oz
    disc = b * b - a * (ox * ox + oz * oz - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        side = (disc >= 0) & (t_side > 0) & (np.abs(oy + t_side * dy) <= r)
        t = np.where(side, t_side, np.inf)
        for cap_y in (-r, r):
            t_cap = (cap_y - oy) / dy
            on_cap = (t_cap > 0) & ((ox + t_cap * dx) ** 2 + (oz + t_cap * dz) ** 2 <= r * r)
            t = np.minimum(t, np.where(on_cap, t_cap, np.inf))
    return t


HIT = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder}


def _trace(objects: list[SceneObject], camera: Camera, size: int):
    """Ray parameter of every surface for every pixel: row 0 floor, 1 wall, k + 2 objects[k]."""
    origin = np.asarray(camera.position, dtype=np.float64)
    rays = _camera_rays(camera, size)
    t = np.empty((len(objects) + 2, len(rays)))
    t[0] = _hit_plane(origin, rays, axis=1, value=0.0)
    t[1] = _hit_plane(origin, rays, axis=2, value=WALL_Z)
    for k, obj in enumerate(objects):
        t[k + 2] = HIT[obj.shape](origin, rays, obj)
    return origin, rays, t


def _object_normals(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    offset = points - np.asarray(obj.position)
    if obj.shape == "sphere":
        normals = offset
    elif obj.shape == "cube":
        local = _rotate_y(offset, -obj.angle)
        face = np.abs(local).argmax(axis=1)
        normals = np.zeros_like(local)
        normals[np.arange(len(local)), face] = np.sign(local[np.arange(len(local)), face])
        normals = _rotate_y(normals, obj.angle)
    else:
        on_cap = np.abs(offset[:, 1]) >= obj.radius * (1 - 1e-9)
        normals = offset * np.array([1.0, 0.0, 1.0])
        normals[on_cap] = np.outer(np.sign(offset[on_cap, 1]), [0.0, 1.0, 0.0])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _visible_fractions(objects: list[SceneObject], camera: Camera) -> list[float]:
    _, _, t = _trace(objects, camera, LAYOUT_CHECK_SIZE)
    visible = np.bincount(t.argmin(axis=0), minlength=len(objects) + 2)[2:]
    silhouette = np.isfinite(t[2:]).sum(axis=1)
    return [float(v / s) if s else 0.0 for v, s in zip(visible, silhouette)]


def _image_x(objects: list[SceneObject], camera: Camera) -> np.ndarray:
    """Horizontal image position of each object's centre (units of focal length, < 0 is left)."""
    right, _, forward = camera.axes()
    offsets = np.array([obj.position for obj in objects]).reshape(-1, 3) - camera.position
    return (offsets @ right) / (offsets @ forward)


# Maps derived from the trace

def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma + 0.5))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for _ in range(2):  # blur rows, transpose, blur rows again, transpose back
        padded = np.pad(image, ((0, 0), (radius, radius)), mode="edge")
        image = sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(kernel)).T
    return image


def _edge_map(instances: np.ndarray, normals: np.ndarray) -> np.ndarray:
    # Objects are convex and stand on the floor, so every depth jump is also an instance change,
    # and the floor-wall corner and cube edges are normal changes: these two cover all edges.
    edges = np.zeros(instances.shape, dtype=bool)
    for axis in (0, 1):
        jump = np.diff(instances.astype(np.int16), axis=axis) != 0
        jump |= (np.diff(normals, axis=axis) ** 2).sum(axis=-1) > 0.4  # normals > ~37 deg apart
        before, after = [slice(None)] * 2, [slice(None)] * 2
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        edges[tuple(before)] |= jump
        edges[tuple(after)] |= jump
    # Edges are 2 px wide; the gain brings a blurred edge's crest back to about 1.
    sigma = max(0.7, instances.shape[0] / 64)
    soft = _gaussian_blur(edges.astype(np.float64), sigma) * 1.25 * sigma
    return np.round(np.clip(soft, 0.0, 1.0) * 255).astype(np.uint8)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


# Text: captions and referring expressions

def _caption(objects: list[SceneObject], image_x: np.ndarray) -> str:
    order = np.argsort(image_x, kind="stable")
    return " and ".join(f"a {objects[k].size} {objects[k].colour} {objects[k].shape}" for k in order)


def _matches(objects: list[SceneObject], reference: SceneObject, fields: tuple[str, ...]) -> list[int]:
    return [j for j, obj in enumerate(objects)
            if all(getattr(obj, f) == getattr(reference, f) for f in fields)]


def _unique_phrase(objects: list[SceneObject], k: int) -> str | None:
    """Shortest "[size] [colour] shape" that fits objects[k] and no other object."""
    for fields in ATTRIBUTE_CHOICES:
        if _matches(objects, objects[k], fields) == [k]:
            return " ".join(getattr(objects[k], f) for f in fields)
    return None


def _extreme_phrase(objects: list[SceneObject], image_x: np.ndarray, k: int) -> str | None:
    """"the leftmost/rightmost {shape}" when objects[k] is clearly the extreme one of its shape."""
    same = sorted(_matches(objects, objects[k], ("shape",)), key=lambda j: image_x[j])
    if len(same) < 2:
        return None
    if same[0] == k and image_x[same[1]] - image_x[k] > RELATION_MARGIN:
        return f"the leftmost {objects[k].shape}"
    if same[-1] == k and image_x[k] - image_x[same[-2]] > RELATION_MARGIN:
        return f"the rightmost {objects[k].shape}"
    return None


def _relation_phrase(objects: list[SceneObject], image_x: np.ndarray, referable: list[int],
                     k: int) -> str | None:
    """"the {shape} left/right of the {anchor}": objects[k] is the only object of its shape on
    that side of a uniquely named, visible anchor, and no object of that shape is near a tie."""
    for anchor in referable:
        anchor_phrase = _unique_phrase(objects, anchor)
        if anchor == k or anchor_phrase is None:
            continue
        same = [j for j in _matches(objects, objects[k], ("shape",)) if j != anchor]
        if any(abs(image_x[j] - image_x[anchor]) <= RELATION_MARGIN for j in same):
            continue
        for side, sign in (("left", -1), ("right", 1)):
            if [j for j in same if sign * (image_x[j] - image_x[anchor]) > 0] == [k]:
                return f"the {objects[k].shape} {side} of the {anchor_phrase}"
    return None


def _referring_expressions(objects: list[SceneObject], image_x: np.ndarray, visibility: list[float],
                           masks: list[np.ndarray]) -> list[ReferringExpression]:
    referable = [k for k in range(len(objects))
                 if visibility[k] >= REFERABLE_VISIBLE and masks[k].any()]
    expressions = []
    for k in referable:
        unique = _unique_phrase(objects, k)
        phrases = (f"the {unique}" if unique else None,
                   _extreme_phrase(objects, image_x, k),
                   _relation_phrase(objects, image_x, referable, k))
        expressions += [ReferringExpression(text, k, masks[k], _box(masks[k]))
                        for text in phrases if text is not None]
    return expressions


# Rendering and layout sampling

def render_objects(objects: list[SceneObject], camera: Camera, size: int) -> Scene:
    """Render an explicit object list with an explicit camera (which must see the wall)."""
    origin, rays, t = _trace(objects, camera, size)
    surface = t.argmin(axis=0)
    depth = t[surface, np.arange(len(rays))]
    points = origin + depth[:, None] * rays

    world_normals = np.zeros_like(points)
    world_normals[surface == 0] = (0.0, 1.0, 0.0)
    world_normals[surface == 1] = (0.0, 0.0, -1.0)
    for k, obj in enumerate(objects):
        hit = surface == k + 2
        world_normals[hit] = _object_normals(obj, points[hit])

    albedo = np.array([FLOOR_RGB, WALL_RGB] + [COLOURS[obj.colour] for obj in objects], dtype=np.float64)
    light = AMBIENT + (1 - AMBIENT) * np.clip(world_normals @ LIGHT, 0.0, None)
    rgb = np.clip(np.round(albedo[surface] * light[:, None]), 0, 255).astype(np.uint8)

    semantic_of_surface = np.array([0, 1] + [CLASSES.index(obj.shape) for obj in objects], np.uint8)
    instance_of_surface = np.array([0, 0] + list(range(1, len(objects) + 1)), np.uint8)
    shape = (size, size)
    semantic = semantic_of_surface[surface].reshape(shape)
    instances = instance_of_surface[surface].reshape(shape)
    normals = (world_normals @ np.stack(camera.axes()).T).reshape(size, size, 3).astype(np.float32)
    depth = depth.reshape(shape).astype(np.float32)

    image_x = _image_x(objects, camera)
    visibility = _visible_fractions(objects, camera)
    masks = [instances == k + 1 for k in range(len(objects))]
    return Scene(
        rgb=rgb.reshape(size, size, 3),
        depth=depth,
        semantic=semantic,
        instances=instances,
        boxes=[_box(mask) for mask in masks],
        edges=_edge_map(instances, normals),
        normals=normals,
        caption=_caption(objects, image_x),
        objects=list(objects),
        referring=_referring_expressions(objects, image_x, visibility, masks),
        camera=camera,
        visibility=visibility,
    )


def _footprint(obj: SceneObject) -> float:
    """Radius of the object's footprint on the floor, whatever its rotation."""
    return obj.radius * math.sqrt(2) if obj.shape == "cube" else obj.radius


def _in_view(obj: SceneObject, camera: Camera) -> bool:
    """All corners of the object's bounding box project inside the image, with a small margin."""
    right, down, forward = camera.axes()
    x, y, z = obj.position
    reach, r = _footprint(obj), obj.radius
    corners = np.array([(x + dx, y + dy, z + dz) for dx in (-reach, reach)
                        for dy in (-r, r) for dz in (-reach, reach)]) - camera.position
    depth = corners @ forward
    limit = 0.95 * math.tan(math.radians(camera.fov_degrees) / 2) * depth
    return bool(np.all(depth > 0) and np.all(np.abs(corners @ right) < limit)
                and np.all(np.abs(corners @ down) < limit))


def _place(rng: np.random.Generator, attributes: list[tuple[str, str, str]],
           camera: Camera) -> list[SceneObject] | None:
    """Put objects with the given (shape, colour, size) on the floor: in view, not touching, each
    at least MIN_VISIBLE visible. None if no such placement was found."""
    for _ in range(50):
        objects = []
        for shape, colour, size in attributes:
            radius = SIZE_RADIUS[size]
            for _ in range(50):
                angle = rng.uniform(0.0, math.pi / 2)
                candidate = SceneObject(shape, colour, size,
                                        (rng.uniform(-1.4, 1.4), radius, rng.uniform(2.8, 4.8)),
                                        radius, angle if shape == "cube" else 0.0)
                apart = all(math.dist(candidate.position[::2], other.position[::2])
                            > _footprint(candidate) + _footprint(other) + 0.05 for other in objects)
                if apart and _in_view(candidate, camera):
                    objects.append(candidate)
                    break
            else:
                break  # this object found no room: start the placement again
        if len(objects) == len(attributes) and min(_visible_fractions(objects, camera)) >= MIN_VISIBLE:
            return objects
    return None


def _check_arguments(n: int = 1, size: int = 16, min_objects: int = 1, max_objects: int = 1) -> None:
    if n < 1:
        raise UserError(f"the number of scenes must be at least 1, got {n}: pass n >= 1")
    if size < 16:
        raise UserError(f"size must be at least 16 pixels, got {size}: pass a size of 16 or more")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise UserError(f"object counts must satisfy 1 <= min_objects <= max_objects <= "
                        f"{MAX_OBJECTS}, got {min_objects} and {max_objects}: pass counts in that range")


def render_scene(seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """Render the random scene of `seed` at size x size pixels."""
    _check_arguments(size=size, min_objects=min_objects, max_objects=max_objects)
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}: pass seed >= 0")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        camera = Camera(position=(rng.uniform(-0.15, 0.15), rng.uniform(1.5, 1.7), rng.uniform(-0.15, 0.15)),
                        yaw=math.radians(rng.uniform(-5, 5)), pitch=math.radians(rng.uniform(17, 23)))
        count = int(rng.integers(min_objects, max_objects + 1))
        attributes = [(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                       SIZES[rng.integers(len(SIZES))]) for _ in range(count)]
        objects = _place(rng, attributes, camera)
        if objects is not None:
            return replace(render_objects(objects, camera, size), seed=seed)
    raise RuntimeError(f"no valid layout found for seed {seed}")


def scene_family(seed: int, n: int, size: int = 64, change: str = "colour") -> list[Scene]:
    """The scene of `seed` and n - 1 variants: the same objects recoloured (change="colour") or
    moved to new places (change="layout"), seen by the same camera."""
    _check_arguments(n, size)
    if change not in FAMILY_CHANGES:
        raise UserError(f"unknown change {change!r}: choose one of {', '.join(FAMILY_CHANGES)}")
    base = render_scene(seed, size)
    family = [base]
    for member in range(1, n):
        rng = np.random.default_rng([seed, member])
        if change == "colour":  # every object takes another colour
            others = [[c for c in COLOURS if c != obj.colour] for obj in base.objects]
            objects = [replace(obj, colour=o[rng.integers(len(o))]) for obj, o in zip(base.objects, others)]
        else:
            objects = _place(rng, [(o.shape, o.colour, o.size) for o in base.objects], base.camera)
            if objects is None:
                raise RuntimeError(f"no new layout found for seed {seed}, member {member}")
        family.append(replace(render_objects(objects, base.camera, size), seed=seed))
    return family


class SynthScenesDataset(torch.utils.data.Dataset):
    """`n` scenes rendered on the fly: item i is `render_scene(seed + i, ...)`, a Scene."""

    def __init__(self, n: int, size: int = 64, seed: int = 0, min_objects: int = 1, max_objects: int = 3):
        _check_arguments(n, size, min_objects, max_objects)
        self.n, self.seed, self.render_arguments = n, seed, (size, min_objects, max_objects)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} scenes")
        return render_scene(self.seed + index, *self.render_arguments)


def scene_grid(seeds: Iterable[int], size: int, path: str | Path) -> Path:
    """Save a PNG with one row per scene: RGB, depth (near is bright), semantic, instances, edges
    and normals, to look at what the renderer makes."""
    _check_arguments(size=size)
    palette = np.array([(0, 0, 0)] + list(COLOURS.values()), np.uint8)  # 0 black, then the colours
    rows = []
    for seed in seeds:
        scene = render_scene(seed, size)
        depth = np.round(255 * (1 - scene.depth / scene.depth.max())).astype(np.uint8)
        normals = np.round((scene.normals + 1.0) / 2.0 * 255.0).astype(np.uint8)
        rows.append(np.concatenate([scene.rgb, np.stack([depth] * 3, axis=-1), palette[scene.semantic + 1],
                                    palette[scene.instances % len(palette)],
                                    np.stack([scene.edges] * 3, axis=-1), normals], axis=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def _save_scene(scene: Scene, folder: Path, stem: str) -> dict:
    """Write one scene's maps as PNGs and return its metadata.jsonl record."""
    depth_mm = depth_to_uint16(scene.depth, 1000.0)
    normals = np.round((scene.normals + 1.0) / 2.0 * 255.0).astype(np.uint8)
    maps = {"file_name": scene.rgb, "depth_file_name": depth_mm, "semantic_file_name": scene.semantic,
            "instances_file_name": scene.instances, "edges_file_name": scene.edges,
            "normals_file_name": normals}
    record = {}
    for key, array in maps.items():
        name = f"{stem}.png" if key == "file_name" else f"{stem}_{key.removesuffix('_file_name')}.png"
        Image.fromarray(array).save(folder / name, compress_level=1)  # uint16 gives a 16-bit PNG
        record[key] = name
    referring = [{"text": r.text, "object_index": r.object_index, "box": list(r.box)} for r in scene.referring]
    return record | {"text": scene.caption, "referring": referring, "objects": [asdict(o) for o in scene.objects],
                     "boxes": [list(box) for box in scene.boxes], "seed": scene.seed}


def write_dataset(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, min_objects: int = 1,
                  max_objects: int = 3, progress: bool = True) -> Path:
    """Render scenes seed .. seed + n - 1 into an imagefolder dataset (metadata.jsonl + PNGs).

    Depth is a 16-bit PNG in millimetres; normals an RGB PNG of (n + 1) / 2 * 255. The dataset
    is written into a hidden folder beside `out_dir` and renamed at the end, so an interrupted
    run leaves no half-written dataset.
    """
    _check_arguments(n, size, min_objects, max_objects)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty: choose another --out or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        indices = track(range(n), description=f"Rendering {n} scenes") if progress else range(n)
        width = max(5, len(str(n - 1)))
        with open(partial / "metadata.jsonl", "w") as metadata:
            for i in indices:
                scene = render_scene(seed + i, size, min_objects, max_objects)
                metadata.write(json.dumps(_save_scene(scene, partial, f"{i:0{width}d}")) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
