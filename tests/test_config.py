import pytest

from medgen.config import PRESETS, config_from_dict, load_config, override, preset_path
from medgen.errors import MedgenError


def test_presets_load():
    for name in PRESETS:
        assert preset_path(name).is_file()
        cfg = load_config(name)
        assert cfg.train.iterations > 0


def test_unknown_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(MedgenError, match=r"unknown key 'train.iteratons'.*iterations"):
        load_config(p)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 4e-3 as the string "4e-3"; a config means the number.
    p = tmp_path / "c.yaml"
    p.write_text("classifier:\n  lr: 4e-3\ntrain:\n  lr: 1E-4\n")
    cfg = load_config(p)
    assert cfg.classifier.lr == pytest.approx(0.004) and cfg.train.lr == pytest.approx(1e-4)
    with pytest.raises(MedgenError, match="classifier.lr must be a number"):
        config_from_dict({"classifier": {"lr": "4e-3x"}})


def test_mistyped_value():
    with pytest.raises(MedgenError, match="train.batch_size must be an integer"):
        config_from_dict({"train": {"batch_size": "four"}})
    with pytest.raises(MedgenError, match="cv.fractions"):
        config_from_dict({"cv": {"fractions": "half"}})


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(MedgenError, match="not valid YAML"):
        load_config(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(MedgenError):
        load_config(p)


def test_override_wins_and_checks_types():
    cfg = config_from_dict({"train": {"iterations": 100}})
    override(cfg, train__iterations=7, seed=None)
    assert cfg.train.iterations == 7 and cfg.seed == 0
    with pytest.raises(MedgenError):
        override(cfg, train__iterations="x")


def test_classifier_ensemble_and_ema_options_are_checked():
    cfg = config_from_dict({"classifier": {"members": 3, "ema_decay": 0.99, "coords": True, "test_flip": True,
                                           "select": "last"}})
    assert cfg.classifier.members == 3 and cfg.classifier.coords and cfg.classifier.select == "last"
    with pytest.raises(MedgenError, match="classifier.members"):
        config_from_dict({"classifier": {"members": 0}})
    with pytest.raises(MedgenError, match="classifier.ema_decay"):
        config_from_dict({"classifier": {"ema_decay": 1.0}})
    with pytest.raises(MedgenError, match="classifier.select"):
        config_from_dict({"classifier": {"select": "first"}})
    quick = load_config("quick").classifier
    assert quick.coords and quick.test_flip and quick.ema_decay > 0  # the quick preset's recipe


@pytest.mark.parametrize("name", ["scenes", "scenes-reference"])
def test_scene_presets_build_their_model_and_step(name):
    from medgen.models import create_model
    from medgen.training.steps import create_step

    cfg = load_config(name)
    kwargs = dict(cfg.models["parallel-vae"], spatial_dims=2, in_channels=3, image_size=64)
    if kwargs.get("broadcast_size", 0) > 64:
        kwargs["broadcast_size"] = 64
    model = create_model("parallel-vae", **kwargs)
    step = create_step("parallel-vae", **cfg.steps.get("parallel-vae", {}))
    assert model.num_decoders >= 5
    assert step.kl_end >= step.kl_start


def test_tissue_preset_builds_a_3d_model_with_one_intensity_per_decoder():
    from medgen.models import create_model
    from medgen.training.steps import create_step

    cfg = load_config("tissue")
    assert cfg.data.size == 32
    model = create_model("parallel-vae", **cfg.models["parallel-vae"], spatial_dims=3, in_channels=1,
                         image_size=cfg.data.size)
    step = create_step("parallel-vae", **cfg.steps["parallel-vae"])
    assert model.num_decoders == 4 and model.appearance_size == 1  # background, CSF, GM, WM
    assert step.likelihood == "mixture"
