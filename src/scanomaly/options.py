"""`--set KEY=VALUE` options, read in one place: the text parsed into values, and each option routed to a
method's config or to its preprocessing.

    options = parse_set(["iterations=500", "preprocessing.image_size=32"])
    config, preprocessing = split_options(HealthyGAN, options)     # `scanomaly train`: one method, strict
    config, preprocessing = method_overrides("padim", options, None, methods)  # `scanomaly benchmark`: several

A key is a config option of the method (`iterations`), a preprocessing option (`image_size`, or
`preprocessing.image_size`), or, in a benchmark, `METHOD.key` for one method only.
"""

from __future__ import annotations

import dataclasses
import json

from .errors import ScanomalyError


def parse_value(text: str):
    """A --set value: true/false (yes/no, on/off), none, int, float, a JSON list, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_set(items) -> dict:
    """["key=value", ...] -> {key: value} (later items win)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ScanomalyError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        out[key.strip()] = parse_value(text)
    return out


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _prep_fields() -> set[str]:
    from .preprocess import Preprocessing

    return _field_names(Preprocessing)


def split_options(cls, options: dict) -> tuple[dict, dict]:
    """(config, preprocessing) options of one method; an option that neither knows is an error."""
    config_fields, prep_fields = _field_names(cls.Config), _prep_fields()
    config, prep = {}, {}
    for key, value in options.items():
        if key.startswith("preprocessing."):
            key = key.split(".", 1)[1]
            if key not in prep_fields:
                raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
            prep[key] = value
        elif key in config_fields:
            config[key] = value
        elif key in prep_fields:
            prep[key] = value
        else:
            raise ScanomalyError(f"unknown option {key!r} for method {cls.name!r}; config options: "
                                 f"{sorted(config_fields)}; preprocessing options: {sorted(prep_fields)}")
    return config, prep


def _method_class(method: str):
    from .detector import get_method

    try:
        return get_method(method)
    except Exception:  # noqa: BLE001 - an unknown method fails in its own run, not here
        return None


def method_overrides(method: str, config_overrides: dict | None, preprocessing_overrides: dict | None,
                     methods: list[str] | None = None) -> tuple[dict, dict]:
    """The (config, preprocessing) overrides one method gets.

    `config_overrides` keys: "key" goes to every method whose config has that option (or, if it is
    a preprocessing option, to every method's preprocessing); "METHOD.key" to that method only;
    "preprocessing.key" / "METHOD.preprocessing.key" to the preprocessing. `preprocessing_overrides`
    go to every method."""
    methods = methods or []
    cls = _method_class(method)
    config_fields = _field_names(cls.Config) if cls is not None else set()
    prep_fields = _prep_fields()
    config, prep = {}, dict(preprocessing_overrides or {})
    for key, value in (config_overrides or {}).items():
        target, name = None, key
        head, _, rest = key.partition(".")
        if rest and head in methods + [method]:
            target, name = head, rest
        if target is not None and target != method:
            continue
        if name.startswith("preprocessing."):
            prep[name.split(".", 1)[1]] = value
        elif name in config_fields or (target is not None and name not in prep_fields):
            config[name] = value  # a wrong METHOD.key fails that method's run with the config's own error
        elif name in prep_fields:
            prep[name] = value
    return config, prep


def check_overrides(methods: list[str], config_overrides: dict | None, preprocessing_overrides: dict | None) -> None:
    """Raise for an option that no method (registered now) and no preprocessing knows."""
    prep_fields = _prep_fields()
    for key in preprocessing_overrides or {}:
        if key not in prep_fields:
            raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
    classes = {m: _method_class(m) for m in methods}
    for key in config_overrides or {}:
        if key.rpartition(".")[2] == "seed":
            raise ScanomalyError("the seed is set per run by the benchmark's seeds; it cannot be overridden")
        head, _, rest = key.partition(".")
        if rest and head in methods:
            if classes[head] is None:
                continue  # not registered: its run fails and reports why
            key, targets = rest, [classes[head]]
        else:
            targets = [c for c in classes.values() if c is not None]
        if key.startswith("preprocessing."):
            if key.split(".", 1)[1] not in prep_fields:
                raise ScanomalyError(f"unknown preprocessing option {key!r}; known: {sorted(prep_fields)}")
            continue
        if key in prep_fields or any(key in _field_names(c.Config) for c in targets):
            continue
        if not targets:
            continue  # no method registered to check against: their runs report it
        known = sorted(set().union(*(_field_names(c.Config) for c in targets)))
        raise ScanomalyError(f"option {key!r} belongs to none of {', '.join(c.name for c in targets)}; "
                             f"config options: {known}; preprocessing options: {sorted(prep_fields)} "
                             "(METHOD.key sets one method's option)")

