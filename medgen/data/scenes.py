"""Seeded procedural 2D multi-object scenes (DESIGN.md section 6), rendered in pure numpy.

A scene is a square room (floor, four walls, open sky) holding 2-5 objects (spheres, boxes,
cylinders) standing on the floor. A camera orbits the room centre; each frame is ray cast against the
analytic primitives (vectorised over all pixels), so the instance mask comes from the same z-buffer
as the image and occlusion is exact. Shading is Lambert with an ambient term and cast shadows.

Mask ids: 0 sky, 1 floor, 2 wall (the background ids), objects 3, 4, ... in scene order.
No renderer library (pyrender, mitsuba, blender) is available offline without a GPU/display, hence
the small hand-written ray caster.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medgen.console import track
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.outputs import staged_dir

BACKGROUND = {0: "sky", 1: "floor", 2: "wall"}
BACKGROUND_IDS = sorted(BACKGROUND)
FIRST_OBJECT_ID = 3
SHAPES = ("sphere", "box", "cylinder")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.18, 0.72, 0.25),
    "blue": (0.16, 0.32, 0.88),
    "yellow": (0.93, 0.84, 0.18),
    "cyan": (0.15, 0.78, 0.82),
    "magenta": (0.82, 0.20, 0.74),
    "orange": (0.95, 0.52, 0.10),
    "purple": (0.50, 0.25, 0.75),
}
SPLITS = ("train", "test", "same-colour", "more-objects")
INDEX_NAME = "scenes.json"

ROOM_HALF = 9.0  # walls at x, z = +-ROOM_HALF
WALL_HEIGHT = 3.6
CAMERA_RADIUS = 7.0
CAMERA_HEIGHT = 3.2
CAMERA_TARGET = (0.0, 0.4, 0.0)
FOV_DEG = 50.0
LIGHT_DIR = np.array([0.45, 0.8, 0.35]) / np.linalg.norm([0.45, 0.8, 0.35])  # towards the light
AMBIENT = 0.35


@dataclass
class SceneObject:
    """One object standing on the floor.

    Attributes:
        shape: "sphere", "box" or "cylinder".
        colour: name in COLOURS.
        position: centre (x, y, z); y is half the object's height so it rests on the floor.
        size: sphere (radius,), box (half x, half y, half z), cylinder (radius, half height).
        yaw: rotation about the vertical axis in radians (boxes only).
    """

    shape: str
    colour: str
    position: tuple[float, float, float]
    size: tuple[float, ...]
    yaw: float = 0.0

    def footprint(self) -> float:
        """Radius of a circle on the floor that holds the object (for non-overlapping placement)."""
        if self.shape == "box":
            return float(np.hypot(self.size[0], self.size[2]))
        return float(self.size[0])


@dataclass
class Scene:
    """A room with objects; `angle` is the camera's orbit angle (radians) for frame 0."""

    objects: list[SceneObject]
    floor_rgb: tuple[float, float, float] = (0.55, 0.52, 0.48)
    wall_rgb: tuple[float, float, float] = (0.70, 0.68, 0.62)
    angle: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Render:
    """One rendered frame: image [H, W, 3] uint8, mask [H, W] int64 ids, depth [H, W] (inf for sky)."""

    image: np.ndarray
    mask: np.ndarray
    depth: np.ndarray


# ----------------------------------------------------------------------------- scene sampling


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise MedgenError(f"unknown scene split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent random stream per (seed, split, scene index): scenes do not depend on n."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(_split_index(split), index)))


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene for `split` (train and test share a distribution; the others shift it).

    Args:
        rng: the scene's random stream.
        split: train | test | same-colour | more-objects.
    """
    _split_index(split)
    n = int(rng.integers(6, 9)) if split == "more-objects" else int(rng.integers(2, 6))
    spread = 3.9 if split == "more-objects" else 3.2
    colour_names = list(COLOURS)
    shared = colour_names[int(rng.integers(len(colour_names)))]
    objects: list[SceneObject] = []
    tries = 0
    while len(objects) < n:
        tries += 1
        if tries > 2000:  # dense draw: start over with fresh positions
            objects, tries = [], 0
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = shared if split == "same-colour" else colour_names[int(rng.integers(len(colour_names)))]
        if shape == "sphere":
            r = float(rng.uniform(0.45, 0.85))
            size: tuple[float, ...] = (r,)
            height = r
        elif shape == "box":
            size = tuple(float(v) for v in rng.uniform(0.35, 0.75, size=3))
            height = size[1]
        else:
            size = (float(rng.uniform(0.35, 0.7)), float(rng.uniform(0.4, 0.9)))
            height = size[1]
        rho = spread * np.sqrt(rng.uniform())
        phi = rng.uniform(0, 2 * np.pi)
        obj = SceneObject(shape, colour, (float(rho * np.cos(phi)), float(height), float(rho * np.sin(phi))),
                          size, float(rng.uniform(0, np.pi / 2)) if shape == "box" else 0.0)
        if all(np.hypot(obj.position[0] - o.position[0], obj.position[2] - o.position[2])
               > obj.footprint() + o.footprint() + 0.15 for o in objects):
            objects.append(obj)
    floor = tuple(float(v) for v in np.clip(np.array([0.55, 0.52, 0.48]) + rng.uniform(-0.08, 0.08, 3), 0, 1))
    wall = tuple(float(v) for v in np.clip(np.array([0.72, 0.70, 0.64]) + rng.uniform(-0.1, 0.1, 3), 0, 1))
    return Scene(objects, floor, wall, float(rng.uniform(0, 2 * np.pi)))


# ----------------------------------------------------------------------------- ray casting


def camera_rays(angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin [3] and unit ray directions [size*size, 3] (row-major, row 0 at the top) for an orbit angle."""
    eye = np.array([CAMERA_RADIUS * np.cos(angle), CAMERA_HEIGHT, CAMERA_RADIUS * np.sin(angle)])
    fwd = np.asarray(CAMERA_TARGET) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(coords, -coords)  # v: +1 at the top row
    scale = np.tan(np.radians(FOV_DEG) / 2)
    d = fwd + scale * (u.reshape(-1, 1) * right + v.reshape(-1, 1) * up)  # [P, 3]
    return eye, d / np.linalg.norm(d, axis=1, keepdims=True)


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance [P] (inf for a miss) and normals [P, 3] of rays o + t d."""
    c = np.asarray(obj.position)
    r = obj.size[0]
    oc = o - c  # [P, 3] or [3]
    b = np.sum(d * oc, axis=-1)
    disc = b * b - (np.sum(oc * oc, axis=-1) - r * r)
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = -b - sq, -b + sq
    t = np.where(t0 > 1e-6, t0, np.where(t1 > 1e-6, t1, np.inf))
    t = np.where(disc >= 0, t, np.inf)
    hit = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    return t, (hit - c) / r


def _hit_box(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in the box's frame (rotated by yaw about y)."""
    c = np.asarray(obj.position)
    e = np.asarray(obj.size)
    cy, sy = np.cos(obj.yaw), np.sin(obj.yaw)
    rot = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])  # world -> local (rows are local axes)
    ol = (o - c) @ rot.T
    dl = d @ rot.T
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1 = (-e - ol) / dl
    t2 = (e - ol) / dl
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    tnear = tmin.max(axis=-1)
    tfar = tmax.min(axis=-1)
    inside = tnear <= 1e-6
    t = np.where(inside, tfar, tnear)
    t = np.where((tnear <= tfar) & (t > 1e-6), t, np.inf)
    axis = np.where(inside, tmax.argmin(axis=-1), tmin.argmax(axis=-1))
    normal_local = np.zeros_like(dl)
    rows = np.arange(dl.shape[0])
    normal_local[rows, axis] = -np.sign(dl[rows, axis])
    return t, normal_local @ rot


def _hit_cylinder(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinder: side surface plus top and bottom caps."""
    c = np.asarray(obj.position)
    r, hh = obj.size
    ox, oy, oz = (o - c).T if o.ndim == 2 else (o - c)
    dx, dy, dz = d.T
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r * r)
    sq = np.sqrt(np.maximum(disc, 0.0))
    best = np.full(d.shape[0], np.inf)
    normal = np.zeros_like(d)
    for ts in ((-b - sq) / a, (-b + sq) / a):
        y = oy + ts * dy
        ok = (disc >= 0) & (ts > 1e-6) & (np.abs(y) <= hh) & (ts < best)
        best = np.where(ok, ts, best)
        side = np.stack([ox + ts * dx, np.zeros_like(ts), oz + ts * dz], axis=-1) / r
        normal = np.where(ok[:, None], side, normal)
    safe_dy = np.where(np.abs(dy) < 1e-12, 1e-12, dy)
    for cap in (hh, -hh):
        ts = (cap - oy) / safe_dy
        x, z = ox + ts * dx, oz + ts * dz
        ok = (ts > 1e-6) & (x * x + z * z <= r * r) & (ts < best)
        best = np.where(ok, ts, best)
        normal = np.where(ok[:, None], np.array([0.0, np.sign(cap), 0.0]), normal)
    return best, normal


_HITS = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _bounding_radius(obj: SceneObject) -> float:
    if obj.shape == "box":
        return float(np.linalg.norm(obj.size))
    if obj.shape == "cylinder":
        return float(np.hypot(*obj.size))
    return float(obj.size[0])


def hit_object(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit distance [P] (inf: miss) and normals [P, 3]; exact primitive tests run only on the rays
    that meet the object's bounding sphere (a conservative cull, several times faster)."""
    c = np.asarray(obj.position)
    r = _bounding_radius(obj) + 1e-6
    oc = o - c
    b = np.sum(d * oc, axis=-1)
    disc = b * b - (np.sum(oc * oc, axis=-1) - r * r)
    idx = np.nonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > 0))[0]
    t = np.full(d.shape[0], np.inf)
    normal = np.zeros_like(d)
    if idx.size:
        t[idx], normal[idx] = _HITS[obj.shape](o if o.ndim == 1 else o[idx], d[idx], obj)
    return t, normal


def _hit_room(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance [P], background id [P] (sky/floor/wall) and normals [P, 3] for the empty room."""
    p = d.shape[0]
    t = np.full(p, np.inf)
    ids = np.zeros(p, dtype=np.int64)
    normal = np.zeros((p, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        tf = np.where(d[:, 1] < -1e-9, -o[1] / d[:, 1], np.inf)
    ids = np.where(np.isfinite(tf), 1, ids)
    t = np.minimum(t, tf)
    normal[np.isfinite(tf)] = (0.0, 1.0, 0.0)
    for axis in (0, 2):
        for sign in (1.0, -1.0):
            with np.errstate(divide="ignore", invalid="ignore"):
                tw = (sign * ROOM_HALF - o[axis]) / d[:, axis]
            y = o[1] + tw * d[:, 1]
            ok = (tw > 0) & (y >= 0) & (y <= WALL_HEIGHT) & (tw < t)
            t = np.where(ok, tw, t)
            ids = np.where(ok, 2, ids)
            n = np.zeros(3)
            n[axis] = -sign
            normal[ok] = n
    return t, ids, normal


def render(scene: Scene, angle: float | None = None, size: int = 128) -> Render:
    """Ray cast one frame of `scene` from orbit angle `angle` (default: the scene's own angle).

    Args:
        scene: the room and its objects.
        angle: camera orbit angle in radians.
        size: image height and width in pixels.
    Returns:
        Render with the image, the instance/background id mask from the z-buffer, and depth.
    """
    eye, d = camera_rays(scene.angle if angle is None else angle, size)
    depth, ids, normal = _hit_room(eye, d)
    albedo = np.where((ids == 1)[:, None], scene.floor_rgb, scene.wall_rgb).astype(np.float64)
    for k, obj in enumerate(scene.objects):
        t, n = hit_object(eye, d, obj)
        closer = t < depth  # z-buffer test: the nearest surface owns the pixel
        depth = np.where(closer, t, depth)
        ids = np.where(closer, FIRST_OBJECT_ID + k, ids)
        normal = np.where(closer[:, None], n, normal)
        albedo = np.where(closer[:, None], COLOURS[obj.colour], albedo)
    solid = np.isfinite(depth)
    # cast shadows: a ray from each visible surface point towards the light, tested against objects
    lit = np.ones(d.shape[0])
    pts = eye + np.where(solid, depth, 0)[:, None] * d + 1e-4 * normal
    idx = np.nonzero(solid & (normal @ LIGHT_DIR > 0))[0]
    ldir = np.broadcast_to(LIGHT_DIR, (idx.size, 3))
    for obj in scene.objects:
        if idx.size == 0:
            break
        t, _ = hit_object(pts[idx], ldir, obj)
        lit[idx[np.isfinite(t)]] = 0.0
    shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT_DIR, 0, 1) * lit
    rgb = albedo * shade[:, None]
    # sky: a vertical gradient by ray elevation
    sky = np.array([0.55, 0.72, 0.95]) + np.clip(d[:, 1:2], 0, 1) * np.array([-0.25, -0.2, -0.05])
    rgb = np.where(solid[:, None], rgb, sky)
    image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8).reshape(size, size, 3)
    return Render(image, ids.reshape(size, size), depth.reshape(size, size))


def frame_angles(scene: Scene, frames: int) -> list[float]:
    """Camera angles of a rotating sequence: `frames` evenly spaced steps of one full orbit."""
    return [scene.angle + 2 * np.pi * f / frames for f in range(frames)]


# ----------------------------------------------------------------------------- writing and loading


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_scenes(out: str | Path, *, n: int, seed: int = 0, split: str = "train", frames: int = 1,
                 size: int = 128, overwrite: bool = False) -> dict[str, Any]:
    """Render `n` scenes (each as `frames` camera angles) into a folder, atomically.

    Layout: images/scene-000000_f00.png (RGB), masks/scene-000000_f00.png (8-bit ids: 0 sky, 1 floor,
    2 wall, 3+ objects), scenes.json (index with per-image object lists) and scenes.csv.

    Args:
        out: output folder (refused if it exists, unless overwrite).
        n: number of scenes.
        seed: random seed; scene i of a split is the same for any n.
        split: train | test (i.i.d. with train, other draws) | same-colour | more-objects.
        frames: frames per scene (a rotating sequence around the room).
        size: image size in pixels (128 by default).
        overwrite: replace an existing folder.
    Returns:
        Summary dict: folder, images, scenes, seconds, scenes_per_s.
    """
    if n < 1 or frames < 1 or size < 8:
        raise MedgenError(f"scenes: need n >= 1, frames >= 1 and size >= 8 (got n={n}, frames={frames}, size={size})")
    _split_index(split)
    start = time.perf_counter()
    render_s = 0.0
    items: list[dict[str, Any]] = []
    with staged_dir(out, overwrite=overwrite, command="scenes") as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in track(range(n), f"rendering {split} scenes"):
            scene = sample_scene(scene_rng(seed, split, i), split)
            sid = f"scene-{i:06d}"
            for f, angle in enumerate(frame_angles(scene, frames)):
                t0 = time.perf_counter()
                r = render(scene, angle, size)
                render_s += time.perf_counter() - t0
                name = f"{sid}_f{f:02d}"
                (tmp / "images" / f"{name}.png").write_bytes(_png_bytes(r.image))
                (tmp / "masks" / f"{name}.png").write_bytes(_png_bytes(r.mask.astype(np.uint8)))
                counts = np.bincount(r.mask.ravel(), minlength=FIRST_OBJECT_ID + len(scene.objects))
                objects = [
                    {"id": FIRST_OBJECT_ID + k, **asdict(o), "visible_pixels": int(counts[FIRST_OBJECT_ID + k])}
                    for k, o in enumerate(scene.objects)
                ]
                items.append({"image": f"images/{name}.png", "mask": f"masks/{name}.png", "scene": sid,
                              "frame": f, "angle_deg": round(float(np.degrees(angle)) % 360, 3),
                              "objects": objects})
        index = {
            "name": "medgen-scenes", "version": 1, "split": split, "seed": seed, "n_scenes": n,
            "frames": frames, "size": size,
            "background": {str(k): v for k, v in BACKGROUND.items()},
            "shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
            "images": items,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        with open(tmp / "scenes.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "mask", "scene", "frame", "angle_deg", "n_objects", "n_visible", "shapes", "colours"])
            for it in items:
                objs = it["objects"]
                w.writerow([it["image"], it["mask"], it["scene"], it["frame"], it["angle_deg"], len(objs),
                            sum(o["visible_pixels"] > 0 for o in objs),
                            ";".join(o["shape"] for o in objs), ";".join(o["colour"] for o in objs)])
    seconds = time.perf_counter() - start
    return {"folder": str(out), "split": split, "scenes": n, "images": len(items), "seconds": round(seconds, 3),
            "scenes_per_s": round(n / seconds, 2), "frames_rendered_per_s": round(len(items) / max(render_s, 1e-9), 2)}


def is_scene_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by write_scenes (it has scenes.json)."""
    return (Path(path) / INDEX_NAME).is_file()


def shapes_present(objects: list[dict[str, Any]]) -> np.ndarray:
    """Multi-hot [len(SHAPES)] of the shapes with at least one visible pixel."""
    out = np.zeros(len(SHAPES), dtype=np.int64)
    for o in objects:
        if o.get("visible_pixels", 1) > 0:
            out[SHAPES.index(o["shape"])] = 1
    return out


def load_scene_dataset(path: str | Path) -> Any:
    """Load a `medgen scenes` folder into an ImageSet.

    Args:
        path: folder holding scenes.json, images/ and masks/.
    Returns:
        ImageSet with images [N, 3, S, S] in [-1, 1], labels zeros (class "scene"), subjects = scene ids
        (frames of one scene share a subject), extras: "masks" [N, S, S] int64, "background_ids"
        (per item list), "objects" (per item list of dicts), "shapes_present" [N, 3] int64.
    """
    root = Path(path)
    index_path = root / INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise MedgenError(f"{index_path}: not found (not a `medgen scenes` folder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise MedgenError(f"{index_path}: unreadable scene index ({e})") from None
    items = index.get("images")
    if not isinstance(items, list) or not items:
        raise MedgenError(f"{index_path}: key 'images' must be a non-empty list")
    images, masks = [], []
    for row, it in enumerate(items):
        for key in ("image", "mask", "scene", "objects"):
            if key not in it:
                raise MedgenError(f"{index_path}: images[{row}] lacks key {key!r}")
        try:
            img = np.asarray(Image.open(root / it["image"]).convert("RGB"))
            mask = np.asarray(Image.open(root / it["mask"]))
        except (OSError, ValueError) as e:
            raise MedgenError(f"{root / it['image']}: unreadable scene image or mask ({e})") from None
        if mask.shape != img.shape[:2]:
            raise MedgenError(f"{root / it['mask']}: mask shape {mask.shape} does not match image {img.shape[:2]}")
        if images and img.shape != images[0].shape:
            raise MedgenError(f"{root / it['image']}: size {img.shape[:2]} differs from the first image {images[0].shape[:2]}")
        images.append(img)
        masks.append(mask)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # [N, H, W, 3] -> [N, 3, H, W]
    bg = [int(k) for k in index.get("background", {str(k): v for k, v in BACKGROUND.items()})]
    return ImageSet(
        images=x / 127.5 - 1.0,
        labels=torch.zeros(len(items), dtype=torch.int64),
        subjects=[str(it["scene"]) for it in items],
        class_names=["scene"],
        affine=None,
        normalisation={"kind": "uint8", "scale": 1 / 127.5, "offset": -1.0},
        sources=[str(root / it["image"]) for it in items],
        extras={
            "masks": torch.from_numpy(np.stack(masks).astype(np.int64)),
            "background_ids": [list(bg) for _ in items],
            "objects": [it["objects"] for it in items],
            "shapes_present": torch.from_numpy(np.stack([shapes_present(it["objects"]) for it in items])),
        },
    )
