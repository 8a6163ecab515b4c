"""Pyarrow schemas at every stage boundary, defined once.

A stage may write extra columns after the required ones (e.g. candidate columns carried
through from the input); readers select the columns they need by name.

Example:
    >>> from wit_builder import schema
    >>> schema.CANDIDATES.names[:3]
    ['uid', 'url', 'caption']
"""

from __future__ import annotations

import pyarrow as pa

QUERIES = pa.schema(
    [
        pa.field("query_id", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # raw, case kept
        pa.field("source", pa.string(), nullable=False),  # wordnet, wiki_unigram, wiki_bigram, title, wordfreq, list...
        pa.field("count", pa.int64()),  # the source's own count (frequency, views); null if none
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),  # blake2b-8 hex of url + "\x1f" + caption
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("page_url", pa.string()),  # WARC/WAT page; null for url lists
    ]
)

QUERY_IDS = pa.list_(pa.int32())

MATCHED = CANDIDATES.append(pa.field("query_ids", QUERY_IDS, nullable=False))

SELECTED = (
    MATCHED.append(pa.field("query_id", pa.int32(), nullable=False))
    .append(
        pa.field("rank", pa.float64(), nullable=False)  # hash draw in [0, 1) of (uid, query_id, seed)
    )
    .append(pa.field("query_text", pa.string(), nullable=False))
)  # the text of query_id (raw, case kept)

# download/{shard}.parquet: one row per selected sample, whatever happened to it.
SAMPLES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # sample key inside the tar (= uid)
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("query_id", pa.int32(), nullable=False),
        pa.field("query_text", pa.string(), nullable=False),
        pa.field("query_ids", QUERY_IDS, nullable=False),
        pa.field("rank", pa.float64(), nullable=False),  # balance's draw: the post-filter trim's order
        pa.field("shard", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "success" | "failed"
        pa.field("error", pa.string()),  # short reason when failed (e.g. "http_404", "not_an_image")
        pa.field("width", pa.int32()),  # after resize
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("bytes", pa.int64()),  # encoded image bytes stored in the tar
        pa.field("sha256", pa.string()),  # of the stored image bytes
    ]
)

# Written by the download stage after SAMPLES' columns; absent from runs made before them.
SAMPLES_EXTRA = pa.schema(
    [
        pa.field("faces_blurred", pa.int32()),  # faces blurred in the stored image; null = blurring off
        pa.field("original_sha256", pa.string()),  # sha256 of the fetched bytes (`sha256`: the stored ones)
    ]
)

# filtered/{shard}.parquet: one row per successful download; drop_reason null = kept.
FILTERED = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("drop_reason", pa.string()),
    ]
)

# shards/metadata/{n:06d}.parquet: one row per sample in the final tars.
SHARD_SAMPLES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("tar", pa.string(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("query_id", pa.int32(), nullable=False),
        pa.field("query_text", pa.string(), nullable=False),
        pa.field("query_ids", QUERY_IDS, nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("nsfw_score", pa.float32()),  # null unless [filter] nsfw is on
        pa.field("faces_blurred", pa.int32()),  # null unless [download] blur_faces was on
    ]
)
