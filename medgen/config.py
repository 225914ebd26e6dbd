"""Typed configuration: one dataclass per YAML section, and the only YAML parser (safe loading).

A config file is validated on load: unknown keys and mistyped values give one clear error naming the
file and the dotted key. Command-line options are applied afterwards with `override`, so they win.
Numbers carry their allowed range (field metadata), checked for the file and the command line alike.
Model and step sections (`models.<name>`, `steps.<name>`) are keyword arguments; their names and keys
are checked against the registries by medgen.training.preflight.check_model_sections (config is below
the model layer), which the CLI runs right after loading (medgen.cli.common.load_config).
YAML aliases are expanded only within a small budget (a "billion laughs" file is refused, not expanded).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from medgen.errors import MedgenError, describe_os_error

PRESETS = ("smoke", "quick", "fidelity", "paper", "scenes", "scenes-reference", "tissue")
PRECISION_NAMES = ("auto", "fp32", "tf32", "bf16", "fp16")
IMAGE_SIZES = (16, 32, 64, 128, 256)  # 4 * 2**n: the encoder/decoder trunks halve/double to 4 voxels
MAX_SEED = 2**32 - 1
YAML_NODE_BUDGET = 100_000  # nodes of a config after alias expansion; real configs have a few hundred
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # a float in exponent notation


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with validation rules: ge, gt, le, lt, choices, pattern, sizes, inf_ok."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


def _check_rules(value: Any, rules: typing.Mapping[str, Any], where: str, source: str) -> None:
    """Raise MedgenError if `value` (or each item of a list) breaks the field's rules."""
    if value is None or not rules:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_rules(v, rules, f"{where}[{i}]", source)
        return
    if isinstance(value, dict):  # e.g. cv.generator_iterations: one budget per model name
        for k, v in value.items():
            _check_rules(v, rules, f"{where}.{k}", source)
        return
    if isinstance(value, float) and not math.isfinite(value) and not (rules.get("inf_ok") and value == math.inf):
        raise MedgenError(f"{source}: {where} must be a finite number, got {value!r}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if any(k in rules and not ok(value, rules[k]) for k, _, ok in bounds):
            want = " and ".join(f"{sym} {rules[k]}" for k, sym, _ in bounds if k in rules)
            raise MedgenError(f"{source}: {where} must be {want}, got {value!r}")
    if "choices" in rules and value not in rules["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in rules["choices"]], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MedgenError(f"{source}: {where} must be one of {', '.join(map(str, rules['choices']))}, got {value!r}{hint}")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], str(value)):
        raise MedgenError(f"{source}: {where} must be {rules['pattern_help']}, got {value!r}")


@dataclass
class DataConfig:
    """Where training data comes from. `path` None means the built-in phantom cohort."""

    path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = None
    size: int = _f(64, choices=IMAGE_SIZES)
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

    iterations: int = _f(1000, ge=1)
    batch_size: int = _f(4, ge=1)
    lr: float = _f(2e-4, gt=0.0)
    ema_decay: float = _f(0.999, ge=0.0, lt=1.0)  # 0 turns the EMA off
    precision: str = _f("auto", choices=PRECISION_NAMES)
    compile: bool = False
    channels_last: bool | None = None
    log_every: int = _f(10, ge=1)
    sample_every: int = _f(500, ge=0)  # 0: no montages
    checkpoint_every: int = _f(500, ge=0)  # 0: only at the end
    max_seconds: float | None = _f(None, gt=0.0, inf_ok=True)
    progress_every: int | None = _f(None, ge=1)  # plain progress lines when stderr is not a terminal (None: ~20 a run)
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard (pip install medgen[tensorboard])
    # What `medgen train` trains on: a share of the subjects of every class held out (a seeded, stratified,
    # subject-level split recorded in RUN/split.json) and the classes kept of the rest (None: all), e.g.
    # classes [CN] and holdout 0.25 for an anomaly detector whose held-out subjects were never seen.
    classes: list[str] | None = None
    holdout: float = _f(0.0, ge=0.0, lt=1.0)


@dataclass
class ClassifierConfig:
    """The 3D classifier trained by cv-evaluate (a MONAI network)."""

    name: Literal["densenet121", "resnet18", "simple", "plain"] = "resnet18"
    base_width: int = _f(8, ge=1, le=1024)
    epochs: int = _f(30, ge=1)
    batch_size: int = _f(8, ge=1)
    lr: float = _f(1e-3, gt=0.0)
    weight_decay: float = _f(1e-4, ge=0.0)
    dropout: float = _f(0.0, ge=0.0, lt=1.0)
    label_smoothing: float = _f(0.0, ge=0.0, lt=1.0)
    norm: Literal["batch", "instance", "layer", "none"] = "batch"  # plain backbone only
    standardize: bool = False  # add a voxelwise-standardised input channel (training-set statistics)
    coords: bool = False  # add coordinate channels (CoordConv): convolutions know where they are
    ema_decay: float = _f(0.0, ge=0.0, lt=1.0)  # exponential moving average of the weights (validated and kept); 0: off
    test_flip: bool = False  # average each prediction with that of the left-right mirrored image
    members: int = _f(1, ge=1, le=16)  # classifiers per arm, one seed each, probabilities averaged (cost: x members)
    schedule: Literal["constant", "cosine"] = "constant"
    select: Literal["accuracy", "balanced_accuracy", "loss", "last"] = "accuracy"  # validation metric that picks the epoch (last: none, keep the final weights)
    flip: bool = False  # random left-right flips of every arm's training batches (class effects are bilateral)


@dataclass
class CVConfig:
    """The augmentation experiment (DESIGN.md section 5)."""

    folds: int = _f(6, ge=2)
    test_size: float = _f(60, gt=0.0)
    models: list[str] = field(default_factory=lambda: ["vae", "gan", "alpha-gan"])
    fractions: list[float] = field(default_factory=lambda: [0.33, 0.5])
    augmentation: list[bool] = field(default_factory=lambda: [False, True])
    augment_synthetic: bool = True  # cross the synthetic arms with `augmentation` too (false: real + aug only)
    # Share of a "+ aug" arm's training images that get the classical augmentation in each batch (the others stay
    # as acquired, as when augmented copies are added to the real set); 1.0: every image, as the reference study.
    augment_share: float = _f(0.5, gt=0.0, le=1.0)
    tstr: bool = True
    generator_iterations: int | dict[str, int] | None = _f(None, ge=1)  # one budget, or one per model name
    synthetic_classes: Literal["match", "balanced"] = "match"
    size: int | None = _f(None, choices=IMAGE_SIZES)  # grid the experiment resamples to (None: data.size), e.g. 32 for CPU runs
    # Controls (DESIGN.md section 5): real-data learning curve (shares of each fold's training subjects),
    # the oracle arm (fresh phantom subjects; None = on for phantom data), permuted-label synthetic arm,
    # a voxel-PCA + logistic baseline, and fresh phantom subjects added to the held-out test set.
    learning_curve: list[float] = _f(factory=lambda: [0.5, 0.75], gt=0.0, lt=1.0)
    oracle: bool | None = None
    permuted: bool = True
    linear_baseline: bool = True
    extra_test: int = _f(0, ge=0)
    # Folds run at once in this many local processes, the machine's torch threads split between them (results do
    # not depend on it beyond floating-point rounding: every fold and arm seeds itself). 2 on a 2-core CPU: small
    # 3D convs use two threads at ~1.4x the speed of one, so two single-thread folds do more work per second.
    workers: int = _f(1, ge=1)


@dataclass
class LauncherConfig:
    """Resources of the jobs `cv-evaluate --launcher` submits (one per fold, through submitit)."""

    partition: str | None = None  # SLURM partition (None: the cluster's default)
    time_minutes: int = _f(240, ge=1)  # wall-clock limit per job
    cpus_per_task: int = _f(4, ge=1)  # also the torch threads of each job
    gpus_per_task: int = _f(0, ge=0)
    mem_gb: int = _f(16, ge=1)
    retries: int = _f(1, ge=0, le=10)  # resubmissions of a failed fold (it resumes: finished arms are kept)


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    seed: int = _f(0, ge=0, le=MAX_SEED)
    device: str = _f("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?", pattern_help="auto, cpu or cuda (or cuda:N)")
    data: DataConfig = field(default_factory=DataConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

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
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 4e-3 (no dot) as a string
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
        _check_rules(kwargs[key], _rules(cls, key), dotted, source)
    return cls(**kwargs)


def _rules(cls: type, name: str) -> typing.Mapping[str, Any]:
    return next((f.metadata for f in dataclasses.fields(cls) if f.name == name), {})


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain mapping (e.g. parsed YAML) into a Config."""
    return _build(Config, data, "", source)


class _BudgetLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose alias expansion exceeds YAML_NODE_BUDGET nodes."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in `node` with every alias expanded (shared sub-graphs counted per use, computed once)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = YAML_NODE_BUDGET + 1  # a cycle (recursive alias) counts as over budget
    total = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, memo) + _expanded_size(v, memo)
            if total > YAML_NODE_BUDGET:
                break
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            total += _expanded_size(v, memo)
            if total > YAML_NODE_BUDGET:
                break
    memo[key] = total
    return total


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML safely (no Python objects) with a budget on alias expansion: the one YAML parser.

    Args:
        text: the YAML text.
        source: the file name used in error messages.
    """
    loader = _BudgetLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > YAML_NODE_BUDGET:
            raise MedgenError(f"{source}: the YAML expands to more than {YAML_NODE_BUDGET} values through "
                              "aliases (&/*); refused (write the values out)")
        return loader.construct_document(node)
    except RecursionError:
        raise MedgenError(f"{source}: the YAML is nested too deeply to read") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedgenError(f"{source}: not valid YAML ({first})") from e
    finally:
        loader.dispose()


def preset_path(name: str) -> Path:
    """Path of a bundled preset (one of PRESETS)."""
    return Path(str(resources.files("medgen.configs").joinpath(f"{name}.yaml")))


def load_config(path: str | Path | None) -> Config:
    """Load and validate a YAML config; a bare preset name (one of PRESETS) picks a bundled file.

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
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MedgenError(f"{p}: not valid YAML (not UTF-8 text)") from e
    except OSError as e:
        raise MedgenError(describe_os_error(e, default_path=p)) from e
    data = load_yaml(text, str(p))
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
        where = ".".join(parts)
        checked = _check_value(value, hints[parts[-1]], where, "command line")
        _check_rules(checked, _rules(type(obj), parts[-1]), where, "command line")
        setattr(obj, parts[-1], checked)
    return cfg
