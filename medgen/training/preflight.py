"""Checks that run before any output is created: config model/step sections, the model and its Step build,
and fit in memory (medgen.models.memory)."""

from __future__ import annotations

import difflib
from typing import Any

from medgen.config import Config
from medgen.errors import MedgenError
from medgen.models.memory import check_model_fits
from medgen.models.registry import check_kwargs, get_model_class, list_models
from medgen.runtime import resolve_device, resolve_precision
from medgen.training.loop import fill_model_kwargs
from medgen.training.steps import check_step_kwargs, create_step

__all__ = ["check_model_fits", "check_model_sections", "preflight_train"]


def check_model_sections(cfg: Config, source: str = "config") -> None:
    """`models.<name>` and `steps.<name>` of a loaded config: registered names (with a did-you-mean) and
    known keys (the model's signature, the Step's fields). `source` names the config in errors."""
    known = list_models()
    for section in ("models", "steps"):
        for name, kwargs in getattr(cfg, section).items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise MedgenError(f"{source}: unknown model {section}.{name}{hint}; known models: {', '.join(known)}")
            if section == "models":
                check_kwargs(get_model_class(name).__init__, kwargs, f"{source}: models.{name}")
            else:
                check_step_kwargs(name, kwargs, f"{source}: steps.{name}")


def preflight_train(model_name: str, model_kwargs: dict[str, Any], step_kwargs: dict[str, Any], data: Any,
                    precision: str, device: str) -> None:
    """Everything `fit` would refuse after creating the run folder, checked before it."""
    kwargs = fill_model_kwargs(model_name, dict(model_kwargs), data)
    check_model_fits(model_name, kwargs, f"models.{model_name}")
    create_step(model_name, **dict(step_kwargs))
    resolve_precision(precision, resolve_device(device))
