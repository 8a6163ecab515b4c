"""Config tables into frozen dataclasses: unknown keys and wrong types rejected, errors named.

The leaf every module may import: `ConfigError` (exit code 2), `from_dict`, path fields and
their resolution, `--set` value parsing and `[run]`. It imports no stage (and of the package
only `io`, itself a leaf); `wit_builder.pipeline` loads whole pipeline files through the stage
registry.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C:
    ...     cap: int = 5
    >>> from_dict(C, {"cap": 7}, where="demo.toml [balance]")
    C(cap=7)
    >>> from_dict(C, {"kap": 7}, where="demo.toml [balance]")
    Traceback (most recent call last):
    ...
    wit_builder.config.ConfigError: demo.toml [balance]: unknown key 'kap' (known: cap)
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin


class ConfigError(Exception):
    """A pipeline configuration problem: the CLI prints it and exits with code 2."""


def path_field(default: Any = "", **kw: Any) -> Any:
    """A dataclass field holding an input path (or list of paths/globs), resolved against the
    TOML file's directory and checked to exist before any work starts."""
    metadata = {"path": True, "must_exist": kw.pop("must_exist", True)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`, naming `where` (file + table) in every error."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    kwargs = {k: _coerce(v, hints[k], f"{where} key {k!r}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation or missing required keys
        raise ConfigError(f"{where}: {e}") from None


def resolve_paths(obj: Any, base_dir: str, where: str, check: bool = True) -> Any:
    """Return a copy of dataclass `obj` with path fields made absolute (against base_dir)."""
    changes: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("path"):
            many = isinstance(value, (list, tuple))
            resolved = [_resolve_one(v, base_dir) for v in (value if many else [value])]
            if check and f.metadata.get("must_exist", True):
                for raw, p in zip(value if many else [value], resolved):
                    if p and not _path_exists(p):
                        raise ConfigError(f"{where} key {f.name!r}: input path not found: {raw!r} ({p})")
            changes[f.name] = resolved if many else resolved[0]
        elif is_dataclass(value):
            changes[f.name] = resolve_paths(value, base_dir, f"{where}.{f.name}", check)
        elif isinstance(value, (list, tuple)) and value and all(is_dataclass(v) for v in value):
            # a list of tables (e.g. [candidates] blocklists): each one's path fields too
            items = [resolve_paths(v, base_dir, f"{where} key {f.name!r}[{i}]", check) for i, v in enumerate(value)]
            changes[f.name] = items if isinstance(value, list) else tuple(items)
    return dataclasses.replace(obj, **changes)


def _resolve_one(p: str, base_dir: str) -> str:
    if not p or "://" in p or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))


def _path_exists(p: str) -> bool:
    """A file or directory (empty ones too) exists, or a glob matches (io.expand's rule)."""
    from wit_builder import io  # io is a leaf too: no cycle

    if not any(c in p for c in "*?["):
        fs, inner = io.filesystem(p)
        return fs.exists(inner)
    try:
        return bool(io.expand([p]))
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class RunConfig:
    """`[run]`: run-wide settings."""

    seed: int = 0
    num_cpus: int = 0  # 0 = all cores of this machine (embedded Ray); ignored with --ray-address
    progress: bool = True


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], TOML-parsed value; bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def parse_value(text: str) -> Any:
    """A `--set` value: TOML (`3`, `"a"`, `[1, 2]`, `true`), else the bare text as a string.

    >>> parse_value("[1, 2]"), parse_value("fast")
    ([1, 2], 'fast')
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_path(table: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    """table[k0][k1]...[kn] = value, creating tables on the way; `text` names the override."""
    node = table
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text!r}: {k!r} is not a table")
    node[keys[-1]] = value
