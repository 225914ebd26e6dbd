"""Issue 11 items 8, 10-12 (config): alias budget, registered model/step names, ranges of every number."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from medgen.cli import common as cli
from medgen.cli.main import app
from medgen.config import Config, config_from_dict, load_config, override
from medgen.errors import MedgenError

BOMB = """
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
models: {vae: {z: *h}}
"""


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(MedgenError, match="aliases"):
        load_config(_write(tmp_path, BOMB))
    assert time.perf_counter() - start < 5


def test_a_few_aliases_are_fine(tmp_path):
    cfg = load_config(_write(tmp_path, "train: &t {iterations: 3}\ncv: {generator_iterations: 4}\n"))
    assert cfg.train.iterations == 3


def test_deep_yaml_is_one_line(tmp_path):
    with pytest.raises(MedgenError, match="c.yaml"):
        load_config(_write(tmp_path, "a: " + "[" * 50_000 + "]" * 50_000 + "\n"))


@pytest.mark.parametrize("text, match", [
    ("models: {vea: {}}\n", "did you mean 'vae'"),
    ("steps: {vea: {}}\n", "did you mean 'vae'"),
    ("models: {vae: {base_widht: 4}}\n", "did you mean 'base_width'"),
    ("steps: {gan: {bogus_weight: 1.0}}\n", "steps.gan: unknown key 'bogus_weight'"),
])
def test_model_and_step_names_are_checked(tmp_path, text, match):
    with pytest.raises(MedgenError, match=match):
        cli.load_config(_write(tmp_path, text))  # every command loads its config this way


def test_a_misspelt_model_section_stops_train_before_the_run_folder(tmp_path):
    cfg = _write(tmp_path, "models: {vea: {}}\n")
    res = CliRunner().invoke(app, ["train", "vae", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "did you mean 'vae'" in res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cv, where", [
    ({"extra_test": -1}, "cv.extra_test"),
    ({"learning_curve": [0.5, 1.0]}, r"cv.learning_curve\[1\]"),
    ({"generator_iterations": 0}, "cv.generator_iterations"),
    ({"generator_iterations": {"vae": 10, "gan": 0}}, "cv.generator_iterations.gan"),
])
def test_new_cv_controls_have_ranges(cv, where):
    with pytest.raises(MedgenError, match=rf"{where} must"):
        config_from_dict({"cv": cv})


def test_generator_iterations_per_model_is_accepted():
    assert config_from_dict({"cv": {"generator_iterations": {"vae": 10}}}).cv.generator_iterations == {"vae": 10}


@pytest.mark.parametrize("text, where", [
    ("train: {ema_decay: 2}\n", "train.ema_decay"),
    ("train: {log_every: -1}\n", "train.log_every"),
    ("train: {sample_every: -5}\n", "train.sample_every"),
    ("train: {checkpoint_every: -1}\n", "train.checkpoint_every"),
    ("train: {max_seconds: -1}\n", "train.max_seconds"),
    ("train: {lr: -0.1}\n", "train.lr"),
    ("train: {lr: .nan}\n", "train.lr"),
    ("train: {precision: fp8}\n", "train.precision"),
    ("train: {iterations: 0}\n", "train.iterations"),
    ("data: {size: 20}\n", "data.size"),
    ("seed: 100000000000000000000000\n", "seed"),
    ("seed: -1\n", "seed"),
    ("device: gpu\n", "device"),
    ("classifier: {dropout: 1.5}\n", "classifier.dropout"),
    ("cv: {folds: 1}\n", "cv.folds"),
])
def test_out_of_range_values_name_the_key(tmp_path, text, where):
    with pytest.raises(MedgenError, match=rf"c\.yaml: {where} must"):
        load_config(_write(tmp_path, text))


def test_command_line_values_are_checked_too():
    with pytest.raises(MedgenError, match="command line: train.lr must be > 0"):
        override(Config(), train__lr=-1.0)
    with pytest.raises(MedgenError, match="train.precision"):
        override(Config(), train__precision="fp8")


def test_presets_still_load():
    for name in ("smoke", "quick", "paper"):
        load_config(name)


@pytest.mark.parametrize("args", [
    ["synth", "--checkpoint", "x", "--out", "o", "--n", "3", "--batch-size", "0"],
    ["synth", "--checkpoint", "x", "--out", "o", "--n", "0"],
    ["segment", "--checkpoint", "x", "--data", "d", "--out", "o", "--panels", "-1"],
    ["evaluate-synth", "--checkpoint", "x", "--n", "0"],
    ["evaluate-synth", "--checkpoint", "x", "--pairs", "0"],
    ["train", "vae", "--out", "o", "--seed", str(10**23)],
    ["train", "vae", "--out", "o", "--iterations", "0"],
])
def test_cli_refuses_out_of_range_options(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output


def test_train_refuses_bad_config_before_making_the_run_folder(tmp_path):
    cfg = _write(tmp_path, "train: {precision: fp8}\n")
    res = CliRunner().invoke(app, ["train", "vae", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "train.precision" in res.output
    assert not (tmp_path / "run").exists()


def test_evaluate_synth_json_folder_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["evaluate-synth", "--checkpoint", "x", "--json", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder" in res.output
