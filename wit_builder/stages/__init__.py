"""Pipeline stages, in run order. Each module exposes `Config` (a frozen dataclass) and
`run(ctx, cfg) -> StageResult`; none imports torch or ray at module level.

Example:
    >>> OUTPUT_DIR["match"]
    'matched'
"""

STAGE_ORDER = ("queries", "candidates", "match", "balance", "download", "filter", "shards")

# where each stage writes, under the run directory
OUTPUT_DIR = {
    "queries": "queries",
    "candidates": "candidates",
    "match": "matched",
    "balance": "selected",
    "download": "download",
    "filter": "filtered",
    "shards": "shards",
}
