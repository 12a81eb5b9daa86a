"""Typed dataclasses from YAML files and `--set a.b=c` overrides, knowing nothing of vbon's own fields.

A field's allowed values or range sit beside it in its metadata (`choice`, `bounded`) and its one-line
docstring is the string literal under it (`field_docs`), so one walker converts and checks every value,
every message names the field, and the config reference is generated from the classes. vbon_ds/config.py
holds the fields themselves and the checks that involve more than one of them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from vbon_ds.errors import VbonError


class ConfigError(VbonError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


def choice(default: Any, *allowed: Any) -> Any:
    """A field whose value must be one of `allowed`."""
    return field(default=default, metadata={"choices": allowed})


def bounded(
    default: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> Any:
    """A numeric field in [low, high] (or (low, high] with open_low)."""
    return field(default=default, metadata={"low": low, "high": high, "open_low": open_low})


# ---------------------------------------------------------------- docstrings and the reference


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


def type_name(tp: Any) -> str:
    """How the reference and the messages spell a field type: "float or null", "list of str"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def reference_tables(root: type) -> str:
    """Markdown tables of each section of the dataclass `root`: every field's type, default and docstring."""
    lines: list[str] = []
    section_docs = field_docs(root)
    for section in dataclasses.fields(root):
        cls = type(getattr(root(), section.name))
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        lines += [
            f"### `{section.name}`: {section_docs[section.name]}",
            "",
            "| key | type | default | meaning |",
        ]
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            allowed = f.metadata.get("choices")
            meaning = docs[f.name] + (f" One of: {', '.join(allowed)}." if allowed else "")
            lines.append(
                f"| `{section.name}.{f.name}` | {type_name(hints[f.name])} | `{default!r}` | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- type conversion and checks


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field type `tp`, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in {"null", "none", "~"})
        if is_null and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return convert(value, arg, where)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value.strip())
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif tp is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                number = float(value.strip())
            if number is not None and not math.isfinite(number):
                raise ConfigError(f"{where}: {number!r} is not a finite number")
            if number is not None:
                return number
        elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")


def check_metadata(value: Any, meta: Mapping[str, Any], where: str) -> None:
    """Refuse a value outside the field's `choice` or `bounded` metadata."""
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{where}: {value!r} is not allowed (allowed: {allowed})")
    if value is None or not isinstance(value, (int, float)):
        return
    low, high, open_low = meta.get("low"), meta.get("high"), meta.get("open_low", False)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if open_low else '['}{lo}, {hi}]"
        raise ConfigError(f"{where}: {value!r} is out of range (allowed: {interval})")


# ---------------------------------------------------------------- applying nested mappings


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(names)})"
    return ConfigError(f"{where}{key}: unknown key{hint}")


def apply_mapping(obj: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass instance `obj` from a nested mapping, converting and checking each value."""
    hints = typing.get_type_hints(type(obj))
    by_name = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in by_name:
            raise _unknown_key(str(key), type(obj), prefix)
        where = f"{prefix}{key}"
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a mapping of {type(current).__name__} fields, got {value!r}"
                )
            apply_mapping(current, value, f"{where}.")
            continue
        converted = convert(value, hints[key], where)
        check_metadata(converted, by_name[key].metadata, where)
        setattr(obj, key, converted)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split one `a.b=c` override into its key path and raw value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    return key.strip().split("."), value


def nest(path: list[str], value: Any) -> dict[str, Any]:
    """The mapping {a: {b: value}} for the key path [a, b]."""
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


def without_fields(
    values: Mapping[str, Any], fields: Iterable[tuple[str, str]]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Nested `values` less the (section, name) `fields`, and which of those fields were there."""
    kept, found = dict(values), []
    for section, name in fields:
        names = kept.get(section)
        if isinstance(names, dict) and name in names:
            kept[section] = {key: value for key, value in names.items() if key != name}
            found.append((section, name))
    return kept, found


# ---------------------------------------------------------------- YAML files


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}: line {line}: key {key!r} is given twice "
                    f"(first on line {seen[key]}); merge the two"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str) -> Any:
    """Parse YAML text with the safe loader, refusing duplicate keys; messages name the file `name`."""
    loader = _UniqueKeyLoader(text)
    loader.name = name  # messages name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_sections(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, or a one-line ConfigError saying what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data
