"""Checked dataclass fields: `option` declares a field with its doc and accepted values; `build` checks a mapping.

The machinery behind `params`: every key and value of a mapping is checked against the field's
type and, where given, its range, choices, list item type or text pattern; a bad one raises
`ParamsError` naming the full key path (``train.epochs``) and what is accepted. Numbers written as
text ('1e-4', which YAML 1.1 reads as a string) are read as numbers; NaN and infinity are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal

from vitprune.errors import ParamsError

_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def option(default: Any, doc: str = "", *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, choices: tuple | Callable[[], tuple] | None = None,
           item: type | None = None, pattern: str | None = None, what: str = "") -> Any:
    """A dataclass field with a doc string and an optional range, choice set, list item type or text pattern.

    `choices` may be a function returning them (a registry's names, read when a value is checked), and
    `default` a function making the default (e.g. every registered method)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "item": item, "pattern": pattern, "what": what}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(meta: dict) -> tuple:
    """A field's accepted values (calling its choices function where it has one); () when any value goes."""
    choices = meta.get("choices")
    return tuple(choices() if callable(choices) else choices or ())



def _accepted(tp: Any, meta: dict) -> str:
    """Human description of what a field accepts."""
    if choices_of(meta):
        return "one of " + ", ".join(map(str, choices_of(meta)))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_accepted(a, {}) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    name = getattr(tp, "__name__", str(tp))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        left = "(" if meta.get("lo_open") else "["
        right = ")" if meta.get("hi_open") else "]"
        return f"{name} in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    return name


def _check_range(key: str, value: Any, meta: dict, tp: Any) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    bad = (lo is not None and (value < lo or (meta.get("lo_open") and value == lo))) or (
        hi is not None and (value > hi or (meta.get("hi_open") and value == hi)))
    if bad:
        raise ParamsError(f"{key}: {value!r} is out of range; accepted: {_accepted(tp, meta)}")


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Check `value` against type `tp` (and the field's range/choices); return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, meta)
            except ParamsError as err:
                if any(w in str(err) for w in ("out of range", "not one of", "finite", "not accepted", "twice")):
                    raise
        raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
        _check_range(key, value, meta, tp)
        return value
    if tp is float:
        number = _number(value)
        if number is None:
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: {_accepted(tp, meta)}")
        if not math.isfinite(number):
            raise ParamsError(f"{key}: {value!r} is not a finite number; accepted: {_accepted(tp, meta)}")
        _check_range(key, number, meta, tp)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a string")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
            raise ParamsError(f"{key}: {value!r} is not accepted; accepted: {meta['what']}")
        if choices_of(meta) and value not in choices_of(meta):
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(choices_of(meta))}")
        return value
    if tp is list:
        return _coerce_list(key, value, meta)
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise TypeError(f"unsupported field type {tp!r} at {key}")  # a bug in this module, not user input


def _number(value: Any) -> float | None:
    """A float from a number or a numeric string ('1e-4', which YAML 1.1 reads as text); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    word = text.lstrip("+-").lstrip(".")
    if word in ("nan", "inf", "infinity"):  # caught as not finite by the caller
        return -float(word) if text.startswith("-") else float(word)
    return float(text) if _NUMERIC.fullmatch(text) else None


def _coerce_list(key: str, value: Any, meta: dict) -> list:
    """A non-empty list without repeats whose items have the field's item type, range and choices."""
    if not isinstance(value, (list, tuple)):
        raise ParamsError(f"{key}: got {value!r} ({type(value).__name__}); accepted: a list")
    if not value:
        raise ParamsError(f"{key}: the list is empty; accepted: at least one {_item_words(meta)}")
    item_type = meta.get("item")
    out = []
    choices = choices_of(meta)
    for i, item in enumerate(value):
        if choices and item not in choices:
            raise ParamsError(f"{key}[{i}]: {item!r} is not one of {', '.join(choices)}")
        if item_type is not None:
            item = _coerce(f"{key}[{i}]", item, item_type, {**meta, "choices": None})
        if item in out:
            raise ParamsError(f"{key}[{i}]: {item!r} is listed twice; accepted: each value once")
        out.append(item)
    return out


def _item_words(meta: dict) -> str:
    if choices_of(meta):
        return "of " + ", ".join(choices_of(meta))
    return getattr(meta.get("item"), "__name__", "value")


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and value."""
    where = prefix or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ParamsError(f"unknown key '{full}'; accepted keys at {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(full, raw[name], hints[name], dict(f.metadata))
    return cls(**kwargs)
