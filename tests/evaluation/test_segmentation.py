import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from medgen.evaluation.segmentation import (
    argmax_segmentation,
    colour_clusters,
    foreground_ari,
    full_ari,
    latent_probe,
    mask_areas,
    match_objects,
    object_pixel_roles,
    object_probe,
    scene_metrics,
    segmentation_covering,
    tissue_dice,
)

BG = [0, 1, 2]
TRUE = np.array([[0, 0, 3, 3, 4, 4],
                 [1, 1, 3, 3, 4, 4],
                 [1, 2, 5, 5, 5, 5]])


def test_ari_edge_cases():
    assert foreground_ari(TRUE, TRUE, BG) == pytest.approx(1.0)
    relabelled = np.where(TRUE == 3, 9, np.where(TRUE == 4, 3, TRUE))  # ARI ignores label names
    assert foreground_ari(TRUE, relabelled, BG) == pytest.approx(1.0)
    assert foreground_ari(TRUE, np.zeros_like(TRUE), BG) == pytest.approx(0.0)  # all in one segment
    # background ignored: whatever is predicted on sky/floor/wall pixels does not change FG-ARI
    noisy_bg = TRUE.copy()
    noisy_bg[np.isin(TRUE, BG)] = 7
    assert foreground_ari(TRUE, noisy_bg, BG) == pytest.approx(1.0)
    assert full_ari(TRUE, noisy_bg) < 1.0
    assert full_ari(TRUE, TRUE) == pytest.approx(1.0)
    assert np.isnan(foreground_ari(np.zeros((2, 2)), np.zeros((2, 2)), BG))
    # a split object scores below 1
    split = TRUE.copy()
    split[2, 2:4] = 8
    assert foreground_ari(TRUE, split, BG) < 1.0


def test_covering_and_areas():
    assert segmentation_covering(TRUE, TRUE, BG) == pytest.approx(1.0)
    merged = np.where(np.isin(TRUE, [3, 4]), 3, TRUE)
    # objects 3 and 4 (4 px each) merged into one 8 px segment: IoU 0.5 each, object 5 exact
    assert segmentation_covering(TRUE, merged, BG) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    pred = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert mask_areas(pred, 3).tolist() == [0.5, 0.5, 0.0]


def test_scene_metrics_summary():
    pred = np.stack([TRUE % 3, np.zeros_like(TRUE)])
    m = scene_metrics(np.stack([TRUE, TRUE]), pred, [BG, BG], 3)
    assert m["images"] == 2 and len(m["per_image"]["fg_ari"]) == 2
    assert m["per_image"]["fg_ari"][1] == pytest.approx(0.0)
    assert m["fg_ari"] == pytest.approx(np.mean(m["per_image"]["fg_ari"]))
    assert sum(m["mask_area"]) == pytest.approx(1.0)


def test_object_pixel_roles_tell_splits_merges_and_background_apart():
    pred = np.array([[0, 0, 3, 4, 4, 6],  # object 4 loses a pixel to decoder 6, which owns nothing: spare
                     [1, 1, 3, 3, 4, 4],  # object 3 loses one to object 4's decoder: other_object
                     [1, 2, 5, 5, 5, 1]])  # object 5 loses one to the floor's decoder: background
    assert object_pixel_roles(TRUE, pred, BG, 7).tolist() == [9, 1, 1, 1]
    assert object_pixel_roles(TRUE, TRUE, BG, 7).tolist() == [12, 0, 0, 0]
    absorbed = np.where(TRUE == 5, 1, TRUE)  # object 5 left to the floor entirely
    assert object_pixel_roles(TRUE, absorbed, BG, 7).tolist() == [8, 4, 0, 0]
    m = scene_metrics(np.stack([TRUE, TRUE]), np.stack([pred, TRUE]), BG, 7)
    assert m["object_pixels"] == pytest.approx({"own": 21 / 24, "background": 1 / 24, "other_object": 1 / 24,
                                                "spare": 1 / 24}, abs=1e-4)


def test_argmax_segmentation():
    w = torch.zeros(1, 3, 1, 2, 2)
    w[0, 2, 0, 0, 0] = 1
    w[0, 1, 0, 1, 1] = 1
    assert argmax_segmentation(w).tolist() == [[[2, 0], [0, 1]]]


def test_tissue_dice_hungarian_matching():
    rng = np.random.default_rng(0)
    tissue = torch.from_numpy(rng.integers(0, 4, size=(2, 6, 6, 6)))
    perm = torch.tensor([4, 2, 0, 1])  # decoder for background, CSF, GM, WM
    res = tissue_dice(perm[tissue], tissue, num_decoders=5)
    assert res["dice"] == {"CSF": pytest.approx(1.0), "GM": pytest.approx(1.0), "WM": pytest.approx(1.0)}
    assert res["matching"] == {"decoder_0": "GM", "decoder_1": "WM", "decoder_2": "CSF"}
    noisy = perm[tissue].clone()
    noisy[0, :3] = 3
    assert res["mean_dice"] > tissue_dice(noisy, tissue, num_decoders=5)["mean_dice"]


def test_latent_probe_beats_baseline_on_informative_latents():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(120, 3))
    mu = rng.normal(size=(120, 2, 4))
    mu[:, 0, :3] += 3 * y  # decoder 0 encodes the labels
    groups = [f"s{i // 2}" for i in range(120)]
    res = latent_probe(mu, y, groups, names=["sphere", "box", "cylinder"])
    assert res["probe"]["mean_label_accuracy"] > 0.9
    assert res["baseline"]["mean_label_accuracy"] < 0.7
    assert abs(res["baseline"]["mean_balanced_accuracy"] - 0.5) < 0.1  # per-fold majorities differ a little
    assert res["probe"]["mean_balanced_accuracy"] > 0.9
    noise = latent_probe(rng.normal(size=(120, 2, 4)), y, groups, names=["a", "b", "c"])
    assert noise["probe"]["mean_label_accuracy"] < 0.7
    assert noise["pooled"]["mean_balanced_accuracy"] < 0.7


def test_pooled_probe_reads_labels_whichever_decoder_holds_them():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(160, 3))
    mu = rng.normal(size=(160, 4, 4))
    holder = rng.integers(0, 4, size=160)  # the decoder that encodes the labels changes per scene
    mu[np.arange(160), holder, :3] += 4 * y
    groups = [f"s{i}" for i in range(160)]
    res = latent_probe(mu, y, groups, names=["sphere", "box", "cylinder"])
    assert res["pooled"]["mean_balanced_accuracy"] > 0.85
    assert res["pooled"]["mean_balanced_accuracy"] > res["probe"]["mean_balanced_accuracy"] + 0.1


def test_match_objects_pairs_each_object_with_its_best_decoder():
    true = np.zeros((4, 4), dtype=np.int64)
    true[:2, :2], true[2:, 2:] = 2, 3  # two objects on background 0
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[:2, :2], pred[2:, 2:], pred[3, 3] = 1, 2, 1  # decoder 1 holds object 2 and one pixel of object 3
    assert match_objects(true, pred, [2, 3], 3) == {2: 1, 3: 2}
    assert match_objects(true, np.zeros_like(pred), [2, 3], 3) == {2: 0}  # one decoder for two: one stays unmatched
    assert match_objects(true, pred, [], 3) == {}


def _probe_scenes(rng: np.random.Generator, informative: bool):
    shapes = ["sphere", "box", "cylinder"]
    n, k, size = 90, 3, 6
    masks, pred = np.zeros((n, size, size), dtype=np.int64), np.zeros((n, size, size), dtype=np.int64)
    mu, objects = rng.normal(size=(n, k, 4)), []
    for i in range(n):
        holders = rng.permutation([1, 2])  # which decoder takes which object changes per scene
        objs = []
        for j, (rows, dec) in enumerate(zip((slice(0, 3), slice(3, 6)), holders, strict=True)):
            shape = int(rng.integers(3))
            masks[i, rows, 2:5], pred[i, rows, 2:5] = 2 + j, dec
            if informative:
                mu[i, dec, shape] += 4.0  # the holder's latent says the shape
            objs.append({"id": 2 + j, "shape": shapes[shape], "visible_pixels": 9})
        objects.append(objs)
    return mu, pred, masks, objects, [f"s{i}" for i in range(n)], shapes


def test_object_probe_reads_the_shape_from_the_matched_decoder():
    rng = np.random.default_rng(0)
    mu, pred, masks, objects, groups, shapes = _probe_scenes(rng, True)
    res = object_probe(mu, pred, masks, objects, groups, names=shapes)
    assert res["objects"] == 180 and res["matched"] == 1.0
    assert res["balanced_accuracy"] > 0.9 and res["one_vs_rest_balanced_accuracy"] > 0.9
    assert abs(res["baseline"] - 1 / 3) < 0.05
    mu, pred, masks, objects, groups, shapes = _probe_scenes(rng, False)
    noise = object_probe(mu, pred, masks, objects, groups, names=shapes)
    assert noise["balanced_accuracy"] < 0.5


def test_colour_baselines_recover_flat_coloured_regions():
    img = np.zeros((2, 3, 16, 16), dtype=np.float32)
    img[:, 0, :, 8:] = 1.0  # left half black, right half red
    img[1, 2, 4:8, 2:6] = 1.0  # a blue square in the second image
    truth = np.zeros((2, 16, 16), dtype=np.int64)
    truth[:, :, 8:] = 1
    truth[1, 4:8, 2:6] = 2
    for method in ("kmeans", "gmm"):
        pred = colour_clusters(img, 3, method=method, seed=0)
        assert pred.shape == (2, 16, 16)
        for i in range(2):
            assert adjusted_rand_score(truth[i].ravel(), pred[i].ravel()) == pytest.approx(1.0)
    flat = colour_clusters(np.zeros((1, 1, 4, 4, 4)), 3)  # one colour: one group, no error
    assert flat.shape == (1, 4, 4, 4) and len(np.unique(flat)) == 1


def test_colour_baseline_ids_follow_brightness_so_a_pooled_dice_can_match_them():
    # the same three intensity classes in two volumes, laid out differently: the ids must agree across volumes
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(2, 8, 8, 8))
    img = np.array([-0.8, 0.0, 0.8])[truth][:, None] + 0.01 * rng.normal(size=(2, 1, 8, 8, 8))
    for method in ("kmeans", "gmm"):
        pred = colour_clusters(img, 3, method=method, seed=0)
        assert np.array_equal(pred, truth)  # darkest group 0, brightest 2, in every volume
        dice = tissue_dice(torch.as_tensor(pred), torch.as_tensor(truth + 1), 3)
        assert min(dice["dice"].values()) == pytest.approx(1.0)
