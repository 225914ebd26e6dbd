"""Typed configuration: one dataclass per YAML section, and the only YAML parser (safe loading).

A config file is validated on load: unknown keys and mistyped values give one clear error naming the
file and the dotted key. Command-line options are applied afterwards with `override`, so they win.
Model and step sections (`models.<name>`, `steps.<name>`) are keyword arguments; they are checked
against the registered model's signature / the Step's fields when those are built.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from medgen.errors import MedgenError

PRESETS = ("smoke", "quick", "paper")


@dataclass
class DataConfig:
    """Where training data comes from. `path` None means the built-in phantom cohort."""

    path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = None
    size: int = 64
    cache: bool = True


@dataclass
class PhantomConfig:
    """The built-in phantom cohort (DESIGN.md section 2)."""

    n: int = 360
    seed: int = 0
    effect_scale: float = 1.0
    size: int = 64
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    """The one training loop's settings (shared by every model)."""

    iterations: int = 1000
    batch_size: int = 4
    lr: float = 2e-4
    ema_decay: float = 0.999
    precision: str = "auto"
    compile: bool = False
    channels_last: bool | None = None
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    max_seconds: float | None = None


@dataclass
class ClassifierConfig:
    """The 3D classifier trained by cv-evaluate (a MONAI network)."""

    name: Literal["densenet121", "resnet18", "simple", "plain"] = "resnet18"
    base_width: int = 8
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.0
    label_smoothing: float = 0.0
    norm: Literal["batch", "instance"] = "batch"  # plain backbone only
    standardize: bool = False  # add a voxelwise-standardised input channel (training-set statistics)
    schedule: Literal["constant", "cosine"] = "constant"
    select: Literal["accuracy", "balanced_accuracy", "loss"] = "accuracy"  # validation metric that picks the epoch
    flip: bool = False  # random left-right flips of every arm's training batches (class effects are bilateral)


@dataclass
class CVConfig:
    """The augmentation experiment (DESIGN.md section 5)."""

    folds: int = 6
    test_size: float = 60
    models: list[str] = field(default_factory=lambda: ["vae", "gan", "alpha-gan"])
    fractions: list[float] = field(default_factory=lambda: [0.33, 0.5])
    augmentation: list[bool] = field(default_factory=lambda: [False, True])
    augment_synthetic: bool = True  # cross the synthetic arms with `augmentation` too (false: real + aug only)
    tstr: bool = True
    generator_iterations: int | dict[str, int] | None = None  # one budget, or one per model name
    synthetic_classes: Literal["match", "balanced"] = "match"
    size: int | None = None  # grid the experiment resamples to (None: data.size), e.g. 32 for CPU runs
    # Controls (DESIGN.md section 5): real-data learning curve (shares of each fold's training subjects),
    # the oracle arm (fresh phantom subjects; None = on for phantom data), permuted-label synthetic arm,
    # a voxel-PCA + logistic baseline, and fresh phantom subjects added to the held-out test set.
    learning_curve: list[float] = field(default_factory=lambda: [0.5, 0.75])
    oracle: bool | None = None
    permuted: bool = True
    linear_baseline: bool = True
    extra_test: int = 0


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cv: CVConfig = field(default_factory=CVConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str, source: str) -> Any:
    """Return `value` converted to `tp` (int -> float allowed), or raise MedgenError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where, source)
            except MedgenError as e:
                errors.append(str(e))
        raise MedgenError(f"{source}: {where} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise MedgenError(f"{source}: {where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise MedgenError(f"{source}: {where} must be a list, got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MedgenError(f"{source}: {where} must be a mapping, got {value!r}")
        return {str(k): _check_value(v, args[1], f"{where}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MedgenError(f"{source}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MedgenError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MedgenError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MedgenError(f"{source}: {where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MedgenError(f"{source}: {where or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise MedgenError(f"{source}: unknown key {dotted!r}{hint}")
        kwargs[key] = _check_value(value, hints[key], dotted, source)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain mapping (e.g. parsed YAML) into a Config."""
    return _build(Config, data, "", source)


def preset_path(name: str) -> Path:
    """Path of a bundled preset (smoke, quick, paper)."""
    return Path(str(resources.files("medgen.configs").joinpath(f"{name}.yaml")))


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config; a bare preset name (smoke/quick/paper) picks a bundled file.

    Args:
        path: a YAML file, a preset name, or None for the defaults.
    """
    if path is None:
        return Config()
    p = Path(path)
    if not p.exists() and str(path) in PRESETS:
        p = preset_path(str(path))
    if not p.is_file():
        raise MedgenError(f"config file {path} not found (presets: {', '.join(PRESETS)})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedgenError(f"{p}: not valid YAML ({first})") from e
    return config_from_dict(data or {}, source=str(p))


def override(cfg: Config, **dotted: Any) -> Config:
    """Apply command-line values (None means "not given") onto a config, validating types.

    Args:
        cfg: the loaded config (changed in place and returned).
        **dotted: keys like train__iterations=5 (double underscore separates sections).
    """
    for key, value in dotted.items():
        if value is None:
            continue
        parts = key.split("__")
        obj = cfg
        for part in parts[:-1]:
            obj = getattr(obj, part)
        hints = typing.get_type_hints(type(obj))
        setattr(obj, parts[-1], _check_value(value, hints[parts[-1]], ".".join(parts), "command line"))
    return cfg
