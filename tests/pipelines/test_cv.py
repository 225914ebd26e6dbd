import json

import numpy as np
import pytest
import torch

from medgen.config import Config
from medgen.data.dataset import ImageSet
from medgen.errors import MedgenError
from medgen.evaluation.splits import Fold, Splits
from medgen.pipelines import cv as cvmod
from medgen.pipelines.cv import (
    LeakageError,
    allocate,
    assert_no_leakage,
    derive_seed,
    n_synthetic,
    plan_arms,
    run_cv,
)

pytestmark = pytest.mark.usefixtures("one_thread")



class Killed(Exception):
    """Stands in for the process being killed half way."""


def tiny_data(n=24, size=16, seed=0):
    """Three classes that differ in mean intensity, one scan per subject."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 1, size, size, size, generator=g) * 0.3 + (labels.float() - 1).view(-1, 1, 1, 1, 1) * 0.5
    return ImageSet(images=x.clamp(-1, 1), labels=labels, subjects=[f"sub-{i:03d}" for i in range(n)],
                    class_names=["CN", "MCI", "AD"], affine=np.eye(4))


def tiny_config(models=("gan",)):
    cfg = Config()
    cfg.device = "cpu"
    cfg.models = {m: {"base_width": 2, "latent_dim": 8} for m in models}
    cfg.train.iterations = 2
    cfg.train.batch_size = 4
    cfg.train.sample_every = 0
    cfg.train.checkpoint_every = 1
    cfg.classifier.base_width = 2
    cfg.classifier.epochs = 1
    cfg.classifier.batch_size = 8
    cfg.cv.folds = 2
    cfg.cv.test_size = 6
    cfg.cv.models = list(models)
    cfg.cv.fractions = [0.5]
    return cfg


def test_arms_plan_and_synthetic_counts():
    arms = plan_arms(["vae", "gan"], [0.33, 0.5], [False, True], tstr=True)
    keys = [a.key for a in arms]
    assert keys[:2] == ["real", "real_aug"]
    assert "gan_f33_aug" in keys and "tstr_vae" in keys and len(keys) == 2 + 2 * (4 + 1)
    assert n_synthetic(0.5, 100) == 100 and n_synthetic(0.33, 100) == 49
    assert allocate(10, [5, 3, 2]) == [5, 3, 2] and sum(allocate(7, [5, 3, 2])) == 7
    assert allocate(9, [5, 3, 1], "balanced") == [3, 3, 3]
    with pytest.raises(MedgenError):
        plan_arms(["gan"], [1.0], [False], tstr=False)
    assert derive_seed(0, 1, "real") == derive_seed(0, 1, "real") != derive_seed(0, 2, "real")


def test_leakage_check_catches_a_planted_leak():
    prov = {"fold": 0, "val": ["a", "b"], "test": ["t"], "generators": {"gan": ["c", "d"]}, "arms": {"real": ["c"]}}
    assert_no_leakage(prov)
    with pytest.raises(LeakageError, match="validation subject b .*generator 'gan'"):
        assert_no_leakage({**prov, "generators": {"gan": ["c", "b"]}})
    with pytest.raises(LeakageError, match="test subject t .*arm 'real'"):
        assert_no_leakage({**prov, "arms": {"real": ["c", "t"]}})


def test_run_refuses_splits_that_leak(tmp_path, monkeypatch):
    data = tiny_data()
    good = cvmod.make_splits

    def leaky(*args, **kwargs):
        sp = good(*args, **kwargs)
        f0 = sp.folds[0]
        # plant: one validation subject also trains
        return Splits(sp.seed, sp.test, [Fold(0, f0.train + [f0.val[0]], f0.val)] + sp.folds[1:], sp.class_names)

    monkeypatch.setattr(cvmod, "make_splits", leaky)
    with pytest.raises(LeakageError, match="leakage in fold 0"):
        run_cv(tiny_config(), tmp_path / "run", data=data)
    assert not (tmp_path / "run" / "fold_0" / "arms").exists()  # nothing trained


def _strip(results):
    """Results without timings (the only thing allowed to differ between runs)."""
    return json.loads(json.dumps(results))["arms"]


def test_every_arm_runs_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    data = tiny_data()
    cfg = tiny_config()
    full = run_cv(cfg, tmp_path / "full", data=data)
    keys = [a["arm"] for a in full["arms"]]
    # in-memory data are not a phantom: no oracle arm
    assert keys == ["real", "linear", "real_aug", "curve_50", "curve_75", "gan_f50", "gan_f50_aug", "tstr_gan",
                    "permuted_f50"]
    for f in (0, 1):
        prov = json.loads((tmp_path / "full" / f"fold_{f}" / "provenance.json").read_text())
        assert set(prov["arms"]) == set(keys) and "gan" in prov["generators"]
        arm = json.loads((tmp_path / "full" / f"fold_{f}" / "arms" / "gan_f50.json").read_text())
        assert arm["n_synthetic"] == arm["n_real"] > 0
        tstr = json.loads((tmp_path / "full" / f"fold_{f}" / "arms" / "tstr_gan.json").read_text())
        assert tstr["n_real"] == 0 and tstr["n_synthetic"] == arm["n_real"]
    for name in ("results.json", "results.csv", "results.md", "accuracy.png", "confusion.png", "splits.json"):
        assert (tmp_path / "full" / name).is_file()
    md = (tmp_path / "full" / "results.md").read_text()
    assert "Δ test bal. acc vs real" in md and md.index("## Verdict") < md.index("## Arms")
    assert "Δ ensemble" in md and "test-subject bootstrap" in md
    for a in full["arms"]:
        if a["arm"] != "real":  # every arm's fold ensemble is compared with real only's on the shared test set
            e = a["ensemble_vs_real"]
            assert e["ci_low"] <= e["ci_high"] and 0 < e["p"] <= 1 and e["n"] == full["n_test"]
    assert "no oracle arm" in md  # the note says why the positive control is missing
    assert set(full["generators"]) == {"gan"} and full["learning_curve"][-1]["arm"] == "real"
    perm = json.loads((tmp_path / "full" / "fold_0" / "arms" / "permuted_f50.json").read_text())
    assert perm["generator"] == "gan" and perm["n_synthetic"] == perm["n_real"]
    agreement = json.loads((tmp_path / "full" / "fold_0" / "generators.json").read_text())["gan"]["class_agreement"]
    assert len(agreement) == 3 and all(0 <= a <= 1 for a in agreement)

    # Interrupt in fold 0 after two arms, then resume.
    real_run_arm = cvmod.run_arm
    calls = []
    resumed_once = False

    def flaky(cfg_, arm, fold, *args, **kwargs):
        calls.append((fold, arm.key))
        if len(calls) == 3 and not resumed_once:
            raise Killed
        return real_run_arm(cfg_, arm, fold, *args, **kwargs)

    monkeypatch.setattr(cvmod, "run_arm", flaky)
    with pytest.raises(Killed):
        run_cv(cfg, tmp_path / "resumed", data=data)
    assert not (tmp_path / "resumed" / "results.json").exists()
    calls.clear()
    resumed_once = True
    resumed = run_cv(cfg, tmp_path / "resumed", data=data, resume=True)
    assert (0, "real") not in calls and (0, "gan_f50") in calls  # finished arms skipped
    a, b = _strip(full), _strip(resumed)
    for x, y in zip(a, b, strict=True):
        for key in ("val_accuracy", "test_accuracy", "test_macro_auc", "test_confusion_sum"):
            assert x[key] == y[key], (x["arm"], key)
    for f in (0, 1):
        for k in keys:
            pa = json.loads((tmp_path / "full" / f"fold_{f}" / "arms" / f"{k}.json").read_text())
            pb = json.loads((tmp_path / "resumed" / f"fold_{f}" / "arms" / f"{k}.json").read_text())
            assert pa["test_predictions"] == pb["test_predictions"], (f, k)

    # A finished run refuses to be overwritten silently; --fold joins; --merge re-aggregates.
    with pytest.raises(MedgenError, match="already exists"):
        run_cv(cfg, tmp_path / "full", data=data)
    again = cvmod.merge(tmp_path / "full")
    assert _strip(again) == _strip(full)


def test_too_few_subjects_is_a_clear_error(tmp_path):
    data = tiny_data(n=9)  # 3 subjects per class
    cfg = tiny_config()
    cfg.cv.folds = 3
    with pytest.raises(MedgenError, match="class 'CN' has 3 subjects"):
        run_cv(cfg, tmp_path / "run", data=data)


def test_learning_curve_share_too_small_is_refused_before_training(tmp_path):
    cfg = tiny_config()
    cfg.cv.learning_curve = [0.2]  # 3 training subjects per class * 0.2 -> 1
    with pytest.raises(MedgenError, match="cv.learning_curve: share 0.2 leaves class"):
        run_cv(cfg, tmp_path / "run", data=tiny_data())
    assert not (tmp_path / "run").exists()


def test_oracle_asked_on_other_data_is_one_clear_error(tmp_path):
    cfg = tiny_config()
    cfg.cv.oracle = True
    with pytest.raises(MedgenError, match="cv.oracle: .*phantom"):
        run_cv(cfg, tmp_path / "run", data=tiny_data())
    assert not (tmp_path / "run").exists()


def test_subject_subset_is_stratified_and_nested():
    data = tiny_data(n=60)
    half = cvmod.subject_subset(data, 0.5, seed=3)
    most = cvmod.subject_subset(data, 0.75, seed=3)
    assert torch.bincount(half.labels).tolist() == [10, 10, 10]
    assert set(half.subjects) < set(most.subjects)
    assert cvmod.subject_subset(data, 0.5, seed=4).subjects != half.subjects


def test_oracle_and_extra_test_subjects_never_collide_or_leak(tmp_path):
    """Fresh phantom subjects: the oracle pool trains, the extra test subjects only test; both keep their ids."""
    data = tiny_data()
    oracle = tiny_data(n=12, seed=5)
    oracle.subjects = [f"oracle:{s}" for s in oracle.subjects]
    extra_test = tiny_data(n=6, seed=6)
    extra_test.subjects = [f"test:{s}" for s in extra_test.subjects]
    cfg = tiny_config()
    cfg.cv.models = []
    cfg.cv.learning_curve = []
    cfg.cv.augmentation = [False]
    splits = cvmod.make_splits(data.subjects, data.labels.numpy(), data.class_names, folds=2, test_size=6, seed=0)
    out = tmp_path / "run"
    (out / "fold_0").mkdir(parents=True)
    res = cvmod.run_fold(cfg, out, data, splits, 0, torch.device("cpu"), False,
                         cvmod.ExtraSubjects(oracle=oracle, test=extra_test))
    prov = json.loads((out / "fold_0" / "provenance.json").read_text())
    assert set(res["arms"]) == {"real", "linear", "oracle_f50"}
    assert {s for s in prov["arms"]["oracle_f50"] if s.startswith("oracle:")}  # the oracle's own ids
    assert set(prov["arms"]["real"]) == set(splits.folds[0].train)
    assert {s for s in prov["test"] if s.startswith("test:")} == set(extra_test.subjects)
    assert res["n_test"] == 12 and res["arms"]["oracle_f50"]["n_real"] == 2 * res["arms"]["real"]["n_real"]


def test_flip_averaged_predictions_are_mirror_invariant():
    from medgen.models import create_model
    from medgen.models.classifier import Classifier

    torch.manual_seed(0)
    kw = Classifier.tiny_kwargs(3) | {"backbone": "plain", "coords": True, "norm": "instance", "image_size": 32}
    model = create_model("classifier", **kw)
    data = tiny_data(n=4, size=32)
    mirrored = ImageSet(images=data.images.flip(2), labels=data.labels, subjects=data.subjects,
                        class_names=data.class_names)
    plain, plain_m = cvmod.predict(model, data), cvmod.predict(model, mirrored)
    assert not np.allclose(plain, plain_m, atol=1e-3)  # the network itself is not symmetric
    both, both_m = cvmod.predict(model, data, flip=True), cvmod.predict(model, mirrored, flip=True)
    assert np.allclose(both, both_m, atol=1e-6) and np.allclose(both, 0.5 * (plain + plain_m), atol=1e-6)


def test_ema_with_last_selection_evaluates_the_final_averaged_weights(tmp_path):
    from medgen.checkpoint import load_checkpoint, model_from_checkpoint

    data = tiny_data(n=30)
    cfg = tiny_config()
    cfg.classifier.name = "plain"
    cfg.classifier.epochs = 3
    cfg.classifier.ema_decay = 0.9
    cfg.classifier.select = "last"
    cfg.classifier.coords = True
    arm = cvmod.Arm("real", "real only", kind="real")
    out = tmp_path / "fold_0" / "arms" / "real"
    res = cvmod.run_arm(cfg, arm, 0, data.subset(range(18)), data.subset(range(18, 24)), data.subset(range(24, 30)),
                        out, torch.device("cpu"))
    assert res["best_iteration"] == res["iterations"] == 3 * (18 // 8)  # no selection: the final weights
    ckpt = load_checkpoint(tmp_path / "fold_0" / res["checkpoint"])
    ema, model = ckpt["state"]["ema"], ckpt["state"]["model"]
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # the average differs from the last step
    kept, _ = model_from_checkpoint(tmp_path / "fold_0" / res["checkpoint"], expected_model="classifier")
    assert np.allclose(cvmod.predict(kept, data.subset(range(24, 30))), res["test_predictions"]["prob"], atol=1e-5)


def test_an_ensemble_arm_averages_its_members_seeds(tmp_path):
    from medgen.checkpoint import model_from_checkpoint

    data = tiny_data(n=30)
    cfg = tiny_config()
    cfg.classifier.members = 2
    arm = cvmod.Arm("real", "real only", kind="real")
    train, val, test = data.subset(range(18)), data.subset(range(18, 24)), data.subset(range(24, 30))
    res = cvmod.run_arm(cfg, arm, 0, train, val, test, tmp_path / "fold_0" / "arms" / "real", torch.device("cpu"))
    paths = [tmp_path / "fold_0" / p for p in res["member_checkpoints"]]
    assert len(paths) == 2 and paths[0] == tmp_path / "fold_0" / res["checkpoint"] and paths[0] != paths[1]
    probs = [cvmod.predict(model_from_checkpoint(p, expected_model="classifier")[0], test) for p in paths]
    assert not np.allclose(probs[0], probs[1])  # two seeds, two different models
    assert np.allclose(np.mean(probs, axis=0), res["test_predictions"]["prob"], atol=1e-5)
    cfg.classifier.members = 1
    single = cvmod.run_arm(cfg, arm, 0, train, val, test, tmp_path / "one" / "arms" / "real", torch.device("cpu"))
    assert "member_checkpoints" not in single
    assert np.allclose(single["test_predictions"]["prob"], probs[0], atol=1e-5)  # member 0 is the plain arm
