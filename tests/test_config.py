"""Config loading: unknown keys, wrong types, missing paths, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from wit_builder.config import ConfigError, from_dict, parse_override, path_field, resolve_paths


@dataclass(frozen=True)
class Inner:
    depth: int = 1


@dataclass(frozen=True)
class Example:
    cap: int = 5
    ratio: float = 1.0
    mode: Literal["strict", "metaclip"] = "strict"
    names: list[str] = field(default_factory=list)
    label: str | None = None
    inner: Inner = field(default_factory=Inner)
    inputs: list[str] = path_field([])

    def __post_init__(self) -> None:
        if self.cap <= 0:
            raise ValueError("cap must be > 0")


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"p\.toml \[balance\]: unknown key 'kap'"):
        from_dict(Example, {"kap": 1}, "p.toml [balance]")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cap": "5"}, "key 'cap': expected an integer"),
        ({"cap": True}, "key 'cap': expected an integer"),
        ({"ratio": "x"}, "key 'ratio': expected a finite number"),
        ({"ratio": float("nan")}, "key 'ratio': expected a finite number"),
        ({"ratio": float("inf")}, "key 'ratio': expected a finite number"),
        ({"mode": "fast"}, "key 'mode': must be one of 'strict', 'metaclip'"),
        ({"names": "a"}, "key 'names': expected a list"),
        ({"names": [1]}, r"key 'names'\[0\]: expected a string"),
        ({"inner": {"deep": 2}}, "unknown key 'deep'"),
        ({"cap": 0}, "cap must be > 0"),
    ],
)
def test_wrong_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Example, data, "p.toml [x]")


def test_values_are_converted():
    cfg = from_dict(Example, {"cap": 7, "ratio": 2, "label": None, "inner": {"depth": 3}}, "w")
    assert cfg == Example(cap=7, ratio=2.0, inner=Inner(depth=3))
    assert isinstance(cfg.ratio, float)


def test_paths_resolve_against_the_toml_dir_and_must_exist(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    cfg = resolve_paths(Example(inputs=["a.txt"]), str(tmp_path), "w")
    assert cfg.inputs == [str(tmp_path / "a.txt")]
    with pytest.raises(ConfigError, match="key 'inputs': input path not found: 'b.txt'"):
        resolve_paths(Example(inputs=["b.txt"]), str(tmp_path), "w")
    assert resolve_paths(Example(inputs=["*.txt"]), str(tmp_path), "w").inputs == [str(tmp_path / "*.txt")]


def test_override_parsing():
    assert parse_override("balance.cap=10") == (["balance", "cap"], 10)
    assert parse_override('candidates.inputs=["a", "b"]') == (["candidates", "inputs"], ["a", "b"])
    assert parse_override("match.mode=word") == (["match", "mode"], "word")
    with pytest.raises(ConfigError):
        parse_override("cap=10")
