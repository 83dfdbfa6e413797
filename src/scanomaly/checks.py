"""Options checked before anything is written.

`build_detector` is how the CLI makes a detector from a profile and the user's options: every config and
preprocessing value is checked against the type of its default (an `iterations` of "five" or an `lr` of
"abc" is an error naming the option, not a traceback later), counts that must be positive are, and a
network that cannot take the options (an `image_size` it cannot be built for) is an `error: ...`.
All of it happens before a run folder or any file exists.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

from .errors import ScanomalyError

# options that count something and must be at least 1 (an `iterations` of 0 trains nothing and saves an
# untrained model); options that must be > 0
_AT_LEAST_ONE = ("iterations", "batch_size", "checkpoint_every", "sample_every", "n_critic")
_POSITIVE_SUFFIXES = ("lr",)


def _type_name(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "text", tuple: "a list",
            list: "a list"}.get(type(value), type(value).__name__)


def _expected(f, hints: dict):
    """The Python types a field accepts, from its annotation (or its default's type)."""
    hint = hints.get(f.name)
    default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
    if hint is not None:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            kinds = tuple(typing.get_origin(a) or a for a in args)
            return kinds, default
        return (origin or hint,), default
    return ((type(default),) if default is not None else None), default


def _accepts(kinds, value) -> bool:
    if kinds is None:
        return True
    for kind in kinds:
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind in (tuple, list) and isinstance(value, (tuple, list)):
            return True
        if kind is str and isinstance(value, str):
            return True
        if kind is typing.Any or (isinstance(kind, type) and kind not in (bool, int, float, str, tuple, list, type(None))
                                  and isinstance(value, kind)):
            return True
    return False


def check_values(dataclass_type, values: dict, what: str) -> None:
    """Each value of `values` (options of `dataclass_type`) has its field's type and a sensible range."""
    if not is_dataclass(dataclass_type):
        return
    try:
        hints = typing.get_type_hints(dataclass_type)
    except Exception:  # an annotation that cannot be resolved: fall back to the defaults' types
        hints = {}
    by_name = {f.name: f for f in fields(dataclass_type)}
    for name, value in values.items():
        f = by_name.get(name)
        if f is None:
            continue  # unknown names are reported by whoever builds the config
        kinds, default = _expected(f, hints)
        if not _accepts(kinds, value):
            shown = _type_name(default) if default is not None else " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
            raise ScanomalyError(f"{what} option {name!r} must be {shown}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ScanomalyError(f"{what} option {name!r} must be a finite number, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (name in _AT_LEAST_ONE or name.endswith("_iterations")) and value < 1:
                raise ScanomalyError(f"{what} option {name!r} must be at least 1, got {value!r}"
                                     + (" (0 iterations would save an untrained model)" if "iterations" in name else ""))
            if (name in _POSITIVE_SUFFIXES or name.endswith("_lr")) and value <= 0:
                raise ScanomalyError(f"{what} option {name!r} must be positive, got {value!r}")


def build_detector(cls, profile: str, config_overrides: dict, preprocessing_overrides: dict,
                   device: str = "cpu", precision: str = "32"):
    """`cls.from_profile(...)` with every option checked first; a network the options cannot make is a
    ScanomalyError naming the method and options."""
    from .preprocess import Preprocessing

    if profile not in cls.profiles:
        raise ScanomalyError(f"{cls.name}: unknown profile {profile!r}; available: {', '.join(cls.profiles)}")
    chosen = cls.profiles[profile]
    check_values(cls.Config, {**chosen.get("config", {}), **(config_overrides or {})}, f"{cls.name}")
    check_values(Preprocessing, {**chosen.get("preprocessing", {}), **(preprocessing_overrides or {})}, "preprocessing")
    try:
        return cls.from_profile(profile, config_overrides, preprocessing_overrides, device=device, precision=precision)
    except ScanomalyError:
        raise
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
        options = {**(config_overrides or {}), **(preprocessing_overrides or {})}
        raise ScanomalyError(f"{cls.name} cannot be built with these options ({exc}); options given: {options}") from None
