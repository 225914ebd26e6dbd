import json

import numpy as np
import pytest
import torch

from medgen.data import scenes as S
from medgen.errors import MedgenError


def _axis_point(s: float) -> tuple[float, float, float]:
    """Point at distance s from the frame-0 camera (angle 0) along its optical axis."""
    eye = np.array([S.CAMERA_RADIUS, S.CAMERA_HEIGHT, 0.0])
    axis = np.asarray(S.CAMERA_TARGET) - eye
    return tuple(eye + s * axis / np.linalg.norm(axis))


def _sphere_before_box():
    sphere = S.SceneObject("sphere", "red", _axis_point(3.5), (0.5,))
    box = S.SceneObject("box", "blue", (0.0, 0.6, 0.0), (0.6, 0.6, 0.6), yaw=0.3)
    return S.Scene([box, sphere], angle=0.0), box, sphere


def test_occlusion_sphere_in_front_of_box_owns_overlap():
    scene, box, sphere = _sphere_before_box()
    r = S.render(scene, size=128)
    eye, d = S.camera_rays(0.0, 128)
    t_box, _ = S._hit_box(eye, d, box)
    t_sph, _ = S._hit_sphere(eye, d, sphere)
    box_px, sph_px = np.isfinite(t_box), np.isfinite(t_sph)
    mask = r.mask.reshape(-1)
    overlap = box_px & sph_px
    assert overlap.sum() > 200  # the sphere really covers part of the box
    sphere_id, box_id = S.FIRST_OBJECT_ID + 1, S.FIRST_OBJECT_ID
    assert np.all(mask[sph_px] == sphere_id)  # nearer object wins, including every overlap pixel
    assert np.all(mask[box_px & ~sph_px] == box_id)
    assert set(np.unique(mask[~box_px & ~sph_px])) <= set(S.BACKGROUND_IDS)


def test_sphere_pixel_count_matches_projection():
    scene, _, sphere = _sphere_before_box()
    r = S.render(scene, size=128)
    dist = 3.5
    alpha = np.arcsin(sphere.size[0] / dist)  # angular radius of the sphere seen from the eye
    radius_px = 64 * np.tan(alpha) / np.tan(np.radians(S.FOV_DEG) / 2)
    expected = np.pi * radius_px**2
    got = int((r.mask == S.FIRST_OBJECT_ID + 1).sum())
    assert abs(got - expected) / expected < 0.05


def test_cylinder_and_room_ids():
    cyl = S.SceneObject("cylinder", "green", (0.0, 0.8, 0.0), (0.6, 0.8))
    r = S.render(S.Scene([cyl], angle=1.0), size=64)
    ids = set(np.unique(r.mask))
    assert {1, 2, S.FIRST_OBJECT_ID} <= ids  # floor, wall and the object are all seen
    assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
    assert np.isinf(r.depth[r.mask == 0]).all() and np.isfinite(r.depth[r.mask > 0]).all()


def test_splits_follow_their_rules():
    for i in range(5):
        same = S.sample_scene(S.scene_rng(0, "same-colour", i), "same-colour")
        assert len({o.colour for o in same.objects}) == 1
        more = S.sample_scene(S.scene_rng(0, "more-objects", i), "more-objects")
        assert 6 <= len(more.objects) <= 8
        train = S.sample_scene(S.scene_rng(0, "train", i), "train")
        assert 2 <= len(train.objects) <= 5
    a = S.sample_scene(S.scene_rng(0, "train", 0))
    b = S.sample_scene(S.scene_rng(0, "test", 0))
    assert a.objects != b.objects
    with pytest.raises(MedgenError, match="unknown scene split"):
        S.scene_rng(0, "nope", 0)


def test_write_is_deterministic_and_loads(tmp_path):
    a = S.write_scenes(tmp_path / "a", n=3, seed=7, frames=2, size=32)
    S.write_scenes(tmp_path / "b", n=3, seed=7, frames=2, size=32)
    assert a["images"] == 6
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 2 + 1  # + the .medgen marker
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    ds = S.load_scene_dataset(tmp_path / "a")
    assert ds.images.shape == (6, 3, 32, 32) and ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.subjects[0] == ds.subjects[1] != ds.subjects[2]  # frames of one scene share a subject
    assert ds.extras["masks"].shape == (6, 32, 32) and ds.extras["masks"].dtype == torch.int64
    assert ds.extras["background_ids"][0] == [0, 1, 2]
    index = json.loads((tmp_path / "a" / "scenes.json").read_text())
    for item, mask in zip(index["images"], ds.extras["masks"], strict=True):
        for o in item["objects"]:
            assert o["visible_pixels"] == int((mask == o["id"]).sum())
    sub = ds.subset([1, 2])
    assert sub.extras["masks"].shape[0] == 2 and len(sub.extras["objects"]) == 2


def test_refuses_existing_and_bad_index(tmp_path):
    S.write_scenes(tmp_path / "a", n=1, size=16)
    with pytest.raises(MedgenError, match="already exists"):
        S.write_scenes(tmp_path / "a", n=1, size=16)
    (tmp_path / "a" / "scenes.json").write_text("{not json")
    with pytest.raises(MedgenError, match="scenes.json"):
        S.load_scene_dataset(tmp_path / "a")
