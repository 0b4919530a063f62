"""Dataclass configs <-> JSON, and `key=value` overrides with one-line errors for unknown keys."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from vlmkit.errors import ConfigError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain JSON-able dicts; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside `tp` (e.g. `VisionConfig | None`), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a JSON or command-line value to the annotated field type (int, float, bool, tuple, ...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except (ValueError, TypeError, ConfigError):
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}")
    if origin is tuple or tp is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        args = typing.get_args(tp)
        inner = args[0] if args else float
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from e
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(names)}")
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def override(obj: T, overrides: dict[str, Any], where: str = "config") -> T:
    """A copy of dataclass `obj` with `overrides` applied.

    Keys may be dotted (`"vision.image_size": 64`) or nested dicts (`vision={"image_size": 64}`).
    Values may be strings from the command line; they are coerced to the field's type.
    """
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})
            if not isinstance(nested[head], dict):
                raise ConfigError(f"{where}: {head!r} is set both as a value and as a section")
            nested[head][rest] = value
        elif isinstance(value, dict) and head in nested:
            nested[head].update(value)
        else:
            nested[head] = value
    names = {f.name for f in dataclasses.fields(obj)}
    hints = _field_types(type(obj))
    changes = {}
    for key, value in nested.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if isinstance(current, dict) and isinstance(value, dict):  # free-form dicts merge
            changes[key] = {**current, **value}
        elif dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = override(current, value, f"{where}.{key}")
        elif _dataclass_in(hints[key]) is not None and isinstance(value, dict):
            changes[key] = from_dict(_dataclass_in(hints[key]), value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["model.vision.width=256", "lr=1e-3"]` -> `{"model.vision.width": "256", "lr": "1e-3"}`."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set lr=1e-3)")
        out[key.strip()] = value.strip()
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, then `os.replace`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(to_dict(obj), indent=2) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
