"""JSON configs as dataclasses: unknown keys named with the nearest known key, values range-checked."""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

from core.errors import PipelineError

T = TypeVar("T")


def option(default: Any, *, low: float | None = None, high: float | None = None,
           choices: tuple | None = None, doc: str = "") -> Any:
    """A config field with its allowed range (inclusive) or its allowed values. A list default is
    copied for each config."""
    metadata = {"low": low, "high": high, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)



def ema_decay_option() -> Any:
    """The `ema_decay` key of a trained model's config (core.training.WeightAverage)."""
    return option(0.0, low=0.0, high=0.99999, doc="exported weights: a moving average of the trained ones with "
                                                  "this decay (0: the trained weights)")


def patience_option() -> Any:
    """The `patience_steps` key of a trained model's config (core.training.Trainer's early stop)."""
    return option(0, low=0, high=10**9, doc="stop when the held-out figure has not improved for this many steps "
                                            "(0: train to the end)")

def _check_type(name: str, value: Any, expected: Any, source: str) -> Any:
    kind = expected if isinstance(expected, str) else getattr(expected, "__name__", str(expected))
    kind = kind.replace(" ", "")
    if kind == "bool":
        if not isinstance(value, bool):
            raise PipelineError(f"{source}: '{name}' must be true or false, got {json.dumps(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PipelineError(f"{source}: '{name}' must be an integer, got {json.dumps(value)}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{source}: '{name}' must be a number, got {json.dumps(value)}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise PipelineError(f"{source}: '{name}' must be a string, got {json.dumps(value)}")
        return value
    if kind in ("int|None", "int|str"):  # an integer, or null / a word the field documents
        other = None if kind == "int|None" else str
        if value is None and other is None or other is str and isinstance(value, str):
            return value
        return _check_type(name, value, "int", source)
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PipelineError(f"{source}: '{name}' must be a list of strings, got {json.dumps(value)}")
        return value
    return value


def config_from_dict(cls: type[T], data: dict, source: str = "config") -> T:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known keys: {', '.join(fields)})"
            raise PipelineError(f"{source}: unknown key '{key}'{hint}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = _check_type(name, data[name], f.type, source)
        low, high, choices = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise PipelineError(f"{source}: '{name}' is {json.dumps(value)}, expected one of "
                                f"{', '.join(json.dumps(c) for c in choices)}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and (low is not None and value < low or high is not None and value > high):
            bounds = f"between {low} and {high}" if low is not None and high is not None else (
                f"at least {low}" if low is not None else f"at most {high}")
            raise PipelineError(f"{source}: '{name}' is {value}, must be {bounds}")
        values[name] = value
    config = cls(**values)
    check = getattr(config, "check", None)
    if check is not None:
        problem = check()
        if problem:
            raise PipelineError(f"{source}: {problem}")
    return config


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


# a config file's key naming the file (a path relative to it) whose settings it starts from
BASE_KEY = "base"


def load_config_file(path: str | Path) -> Any:
    """A config file's settings: with a "base" key, its own keys over those of the file that key names,
    merged object by object (so a preset's file holds only what differs from another preset's)."""
    return _load_with_bases(Path(path), seen=())


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> Any:
    data = load_json(path)
    if not isinstance(data, dict) or BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise PipelineError(f"{path}: \"{BASE_KEY}\" must name another config file (a path relative to this one)")
    base_path, seen = path.parent / base, seen + (path.resolve(),)
    if base_path.resolve() in seen:
        raise PipelineError(f"{path}: its \"{BASE_KEY}\" {base} leads back to itself")
    if not base_path.is_file():
        raise PipelineError(f"{path}: its \"{BASE_KEY}\" {base_path} is not a file")
    return _merged(_load_with_bases(base_path, seen), data)


def _merged(base: Any, own: dict) -> dict:
    if not isinstance(base, dict):
        return own
    merged = dict(base)
    for key, value in own.items():
        both_objects = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_objects else value
    return merged


def load_config(cls: type[T], path: str | Path | None) -> T:
    """Read a config file (and its base) into `cls`; no path gives the defaults."""
    if path is None:
        return cls()
    return config_from_dict(cls, load_config_file(path), source=str(path))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
