"""Reading raw YAML values into typed config sections: type coercion with one-line errors, and
near-miss suggestions for unknown names (megasft.config uses these for files and overrides)."""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, Optional, get_args, get_origin, get_type_hints

from megasft.errors import ConfigError


def yaml_message(path: str, err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"YAML syntax error ({problem}) at {where}; fix that line of the config file"


def unknown_message(kind: str, name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} valid: {sorted(valid)}"


def build_section(name: str, typ: type, raw: dict) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {raw!r}")
    hints = get_type_hints(typ)
    valid = {f.name for f in fields(typ)}
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(unknown_message(f"key in section {name!r}:", key, valid))
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return typ(**kwargs)


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    if get_origin(hint) is Optional or (get_origin(hint) is not None and type(None) in get_args(hint)):
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float:
        # YAML reads 1e-5 (no dot) as a string; anything float() cannot read is not a number.
        try:
            return float(value) if isinstance(value, str) else _not_a_number(where, value)
        except ValueError:
            _not_a_number(where, value)
    base = get_origin(hint) or hint
    if base is str and isinstance(value, bool) and where == "train.progress_bar":
        # YAML 1.1 reads a bare on/off as a boolean.
        value = "on" if value else "off"
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if base in (str, dict, list) and not isinstance(value, base):
        raise ConfigError(f"{where} must be a {base.__name__}, got {value!r}")
    return value


def _not_a_number(where: str, value: Any):
    raise ConfigError(f"{where} must be a number, got {value!r}; write a number such as 0.001 or 1e-3")
