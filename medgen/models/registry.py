"""Model registry, the one list of models: register_model / create_model(name, **kwargs) / list_models().

A model module registers its class with @register_model(name); medgen/models/__init__.py imports every
model module, and since any import of medgen.models.registry runs that package __init__ first, the
registry is complete whenever it is used. Steps (training/steps) register against these classes, the
CLI and configs name models by these names.

Models are built from explicit typed keyword arguments only; create_model checks names and types
against the constructor's signature so a typo in a config gives one clear error.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from medgen.errors import MedgenError

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a model under `name`."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        _MODELS[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def list_models(generative: bool = False) -> list[str]:
    """Names of all registered models (with generative=True, those that can sample: `sample()` + `latent_dim`)."""
    return sorted(n for n, cls in _MODELS.items() if not generative or hasattr(cls, "sample"))


def get_model_class(name: str) -> type[nn.Module]:
    """The class registered under `name`, or a clear error listing the known names."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MedgenError(f"unknown model {name!r}{hint}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def model_defaults(name: str) -> dict[str, Any]:
    """The constructor's keyword arguments and their defaults (empty for required ones)."""
    sig = inspect.signature(get_model_class(name).__init__)
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.name != "self" and p.kind == inspect.Parameter.KEYWORD_ONLY
    }


def check_kwargs(fn: Callable, kwargs: dict[str, Any], what: str) -> None:
    """Raise MedgenError if `kwargs` has a name `fn` does not take or a value of the wrong type."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    names = [p for p in sig.parameters if p != "self"]
    for key, value in kwargs.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (takes: {', '.join(names)})"
            raise MedgenError(f"{what}: unknown argument {key!r}{hint}")
        tp = hints.get(key)
        if tp in (int, float, bool, str) and value is not None:
            ok = isinstance(value, tp) or (tp is float and isinstance(value, int))
            if isinstance(value, bool) and tp is not bool:
                ok = False
            if not ok:
                raise MedgenError(f"{what}: argument {key!r} must be {tp.__name__}, got {value!r}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model from keyword arguments.

    Args:
        name: registry name (see list_models()).
        **kwargs: the model's typed keyword arguments.
    """
    cls = get_model_class(name)
    check_kwargs(cls.__init__, kwargs, f"model {name!r}")
    model = cls(**kwargs)
    model.init_kwargs = dict(kwargs)  # type: ignore[attr-defined]
    return model

