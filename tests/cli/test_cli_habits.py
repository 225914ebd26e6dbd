"""CLI conventions (issue 14 item 7): defaults and choices in --help, completion, -V, options checked
before any work, usage errors exit 2, the environment variables documented."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import typer.rich_utils
from typer.testing import CliRunner

import medgen
from medgen.cli import common
from medgen.cli.commands import scenes as scenes_cmd
from medgen.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)  # one help row per option


def help_text(*command: str) -> str:
    r = CliRunner().invoke(app, [*command, "--help"])
    assert r.exit_code == 0, r.output
    return " ".join(r.output.replace("│", " ").split())


def test_train_help_shows_defaults_and_choices(wide):
    text = help_text("train")
    assert "<vae|gan|alpha-gan|parallel-vae>" in text
    assert "<auto|fp32|tf32|bf16|fp16>" in text
    for shown in ("config train.iterations = 1000", "config train.batch_size = 4", "config train.precision = auto",
                  "config seed = 0", "config train.compile = false", "config data.image_column = image"):
        assert f"[default: ({shown})]" in text, shown


@pytest.mark.parametrize("command,shown", [
    ("phantom", ["config phantom.n = 360", "config phantom.size = 64", "config phantom.effect_scale = 1.0"]),
    ("synth", ["<data|model>", "[default: data]", "[default: 0]", "[default: 8]"]),
    ("scenes", ["<train|test|same-colour|more-objects>", "[default: train]", "[default: 1000]"]),
    ("cv-evaluate", ["config cv.folds = 6", "config cv.models = vae,gan,alpha-gan", "config cv.fractions = 0.33,0.5"]),
    ("evaluate-synth", ["[default: 20]", "[default: 200]", "as many as real"]),
])
def test_other_commands_show_defaults_and_choices(wide, command, shown):
    text = help_text(command)
    for s in shown:
        assert s in text, s


def test_choices_agree_with_the_library():
    from medgen.data.scenes import SPLITS
    from medgen.models.registry import get_model_class, list_models

    # medgen's own generative models (other tests register throw-away ones)
    ours = [m for m in list_models(generative=True) if get_model_class(m).__module__.startswith("medgen.models.")]
    assert sorted(typing.get_args(common.GenerativeModel)) == sorted(ours)
    assert typing.get_args(scenes_cmd.SceneSplit) == SPLITS


def test_version_short_flag_and_completion():
    r = CliRunner().invoke(app, ["-V"])
    assert r.exit_code == 0 and r.stdout.strip() == f"medgen {medgen.__version__}"
    text = help_text()
    assert "--install-completion" in text and "--show-completion" in text


def test_environment_is_documented(wide):
    text = help_text()
    for var in ("MEDGEN_QUIET", "MEDGEN_DEBUG", "MEDGEN_CACHE_DIR"):
        assert var in text
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"MEDGEN_QUIET=1` turns off progress bars", readme)


def test_bad_options_rejected_before_any_work(tmp_path, monkeypatch):
    import medgen.data

    def no_loading(*a, **k):
        raise AssertionError("volumes were loaded before the options were checked")

    monkeypatch.setattr(medgen.data, "load_config_data", no_loading)
    runner = CliRunner()
    r = runner.invoke(app, ["train", "vae", "--out", str(tmp_path / "r"), "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output and not (tmp_path / "r").exists()
    r = runner.invoke(app, ["train", "vae", "--out", str(tmp_path / "r"), "--precision", "fp16", "--device", "cpu"])
    assert r.exit_code == 1 and "fp16 needs a CUDA device" in r.output and not (tmp_path / "r").exists()
    r = runner.invoke(app, ["train", "vea", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "vae" in r.output
    r = runner.invoke(app, ["scenes", "--out", str(tmp_path / "s"), "--split", "validation"])
    assert r.exit_code == 2 and not (tmp_path / "s").exists()
    r = runner.invoke(app, ["synth", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "y"), "--n", "1",
                            "--scale", "raw"])
    assert r.exit_code == 2
