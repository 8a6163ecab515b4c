"""The stage registry: stage name -> its module (`Config`, `run`, optional `preflight`).

The only module that imports every stage; no stage imports it, so there is no cycle.

Example:
    >>> config_class("balance")().cap
    20000
    >>> list(STAGES) == list(STAGE_ORDER)
    True
"""

from __future__ import annotations

from types import ModuleType

from wit_builder.stages import STAGE_ORDER, balance, candidates, download, filter, match, queries, shards

STAGES: dict[str, ModuleType] = {
    "queries": queries,
    "candidates": candidates,
    "match": match,
    "balance": balance,
    "download": download,
    "filter": filter,
    "shards": shards,
}
assert tuple(STAGES) == STAGE_ORDER


def stage_module(name: str) -> ModuleType:
    return STAGES[name]


def config_class(name: str) -> type:
    return STAGES[name].Config
