"""Rebuild the shipped default list from its recipe: ``python -m wit_builder.querybuild.rebuild_default``.

Reads ``queries/default.toml`` (a ``[queries]`` table), runs the queries stage in a temporary
run directory and writes ``queries/default_queries.parquet`` and ``queries/default_stats.json``.
Needs WordNet (``apt-get install wordnet-base``) and ``pip install wordfreq``. The output
depends only on the recipe, the files it names and the wordfreq / WordNet versions, so a
rebuild gives the same list.

Example:
    >>> recipe_path().endswith("queries/default.toml")
    True
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import tomllib

from wit_builder.config import ConfigError, from_dict, resolve_paths
from wit_builder.querybuild.default_list import FILE_NAME, default_path


def recipe_path() -> str:
    return os.path.join(os.path.dirname(default_path()), "default.toml")


def rebuild(recipe: str, out_dir: str, show_progress: bool = True) -> dict:
    """Build the list of `recipe` into `out_dir`; returns the stage's stats."""
    from wit_builder import io
    from wit_builder.stages import queries
    from wit_builder.stages.base import StageContext

    with open(recipe, "rb") as f:
        table = tomllib.load(f).get("queries", {})
    where = f"{recipe} [queries]"
    cfg = resolve_paths(from_dict(queries.Config, table, where), os.path.dirname(os.path.abspath(recipe)), where)
    with tempfile.TemporaryDirectory(prefix="wit-default-queries-") as run_dir:
        ctx = StageContext(run_dir=run_dir, progress=show_progress)
        result = queries.run(ctx, cfg)
        print(result.line("queries"), file=sys.stderr)
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(os.path.join(ctx.stage_dir("queries"), queries.OUTPUT_FILE), os.path.join(out_dir, FILE_NAME))
        stats = io.read_json(os.path.join(ctx.stage_dir("queries"), queries.STATS_FILE))
    io.write_json(stats, os.path.join(out_dir, "default_stats.json"))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=recipe_path())
    p.add_argument("--out-dir", default=os.path.dirname(default_path()))
    args = p.parse_args(argv)
    try:
        rebuild(args.recipe, args.out_dir)
    except ConfigError as e:
        print(f"rebuild_default: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
