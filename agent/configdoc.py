"""The configuration reference, generated from the typed config itself.

The README's reference table is this function's output (a test keeps them equal), so a new
option, default or bound shows up there without anyone remembering to document it.

Examples
--------
>>> text = reference()
>>> "| `train.meta_batch` |" in text
True
"""

from __future__ import annotations

import dataclasses
import typing

from agent.config import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _type_name(args[0]) + " or null"
    if origin in (tuple, list):
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp)).replace("Any", "any")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value) or (isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0])):
        return "see below" if dataclasses.is_dataclass(value) else "one default entry"
    return _yaml_like(value)


def _yaml_like(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml_like(v) for v in value) + "]"
    return repr(value).replace("'", "")


def _rules(field: dataclasses.Field) -> str:
    meta = field.metadata or {}
    parts = []
    for key, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sign} {meta[key]}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(str(c) for c in meta["choices"]))
    doc = meta.get("doc") or ""
    return "; ".join(p for p in (", ".join(parts), doc) if p)


def _rows(cls, prefix: str, hints_cache: dict) -> list[str]:
    hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
    rows = []
    open_field = getattr(cls, "_open", None)
    for field in dataclasses.fields(cls):
        if field.name == open_field:
            rows.append(f"| `{prefix}*` | | | other keys: passed through as options (checked where they are used) |")
            continue
        tp = hints[field.name]
        key = f"{prefix}{field.name}"
        nested = tp if dataclasses.is_dataclass(tp) else None
        args = typing.get_args(tp)
        item = args[0] if args and dataclasses.is_dataclass(args[0]) else None
        if nested is not None:
            rows.extend(_rows(nested, key + ".", hints_cache))
        elif item is not None:
            rows.append(f"| `{key}` | list of entries | {_default(field)} | each entry has the `{key}[].*` keys below |")
            rows.extend(_rows(item, key + "[].", hints_cache))
        else:
            rows.append(f"| `{key}` | {_type_name(tp)} | {_default(field)} | {_rules(field)} |")
    return rows


def reference() -> str:
    """A Markdown table of every configuration key: type, default, allowed values."""
    lines = ["| key | type | default | allowed / meaning |", "|---|---|---|---|"]
    lines += _rows(Config, "", {})
    return "\n".join(lines) + "\n"


def readme_block() -> str:
    """The reference between the README's markers."""
    return f"{BEGIN}\n{reference()}{END}"
