"""The numpy core of balancing: hash draws, attribution, MetaCLIP's rule, strict thresholds.

Rows come as a CSR of matched query ids (`offsets`, `qids`: row i matched
qids[offsets[i]:offsets[i+1]]) plus each row's uid as a uint64 (the 16 hex digits). Every
random choice is a hash of (uid, query_id, seed), so a row's fate never depends on how rows
are split into blocks or workers.

Example:
    >>> import numpy as np
    >>> offsets, qids = np.array([0, 1, 3, 4]), np.array([0, 0, 1, 1])
    >>> uids = np.array([11, 22, 33], dtype=np.uint64)
    >>> counts = np.bincount(qids, minlength=2)          # containing counts: [2, 2]
    >>> keep, qid, rank = metaclip_select(offsets, qids, uids, counts, target=5.0, seed=0)
    >>> keep.tolist(), qid.tolist()                     # tail queries keep every pair
    ([True, True, True], [0, 0, 1])
"""

from __future__ import annotations

import binascii
import math

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_I64_MAX = np.iinfo(np.int64).max


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection on uint64 with good avalanche)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def pair_hash(uid64: np.ndarray, qids: np.ndarray, seed: int) -> np.ndarray:
    """uint64 hash of (uid, query_id, seed), elementwise."""
    with np.errstate(over="ignore"):
        salt = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(1))
        q = _mix(np.asarray(qids).astype(np.uint64) * _GOLDEN + salt)
        return _mix(np.asarray(uid64, dtype=np.uint64) ^ q)


def to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1) (top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uids_to_u64(uids) -> np.ndarray:
    """16-hex-digit uids (a pyarrow string array or a list of str) -> uint64.

    >>> uids_to_u64(["00000000000000ff", "8000000000000000"]).tolist()
    [255, 9223372036854775808]
    """
    import pyarrow as pa

    arr = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    if arr.null_count or not np.all(np.diff(offsets) == 16):
        raise ValueError("uids must be 16 hex digits")
    data = memoryview(arr.buffers()[2])[offsets[0] : offsets[-1]]
    return np.frombuffer(binascii.unhexlify(data), dtype=">u8").astype(np.uint64)


def rarest_key(qids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sort key per pair: smaller = rarer query (fewer containing rows), ties by lower id."""
    q = np.asarray(qids, dtype=np.int64)
    return counts[q].astype(np.int64) * len(counts) + q


def _row_min(values: np.ndarray, offsets: np.ndarray, empty: int) -> np.ndarray:
    starts = offsets[:-1]
    nonempty = np.diff(offsets) > 0
    out = np.full(len(starts), empty, dtype=np.int64)
    if len(values):
        mins = np.minimum.reduceat(values, np.minimum(starts, len(values) - 1))
        out[nonempty] = mins[nonempty]
    return out


def attribute_rarest(offsets: np.ndarray, qids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, its rarest matched query (ties: lower query_id); -1 for a row with none.

    >>> attribute_rarest(np.array([0, 2, 3]), np.array([0, 1, 0]), np.array([5, 2])).tolist()
    [1, 0]
    """
    key = _row_min(rarest_key(qids, counts), np.asarray(offsets), _I64_MAX)
    return np.where(key == _I64_MAX, -1, key % len(counts))


def metaclip_select(
    offsets: np.ndarray, qids: np.ndarray, uid64: np.ndarray, counts: np.ndarray, target: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MetaCLIP's rule: pair (row, q) succeeds when u(uid, q, seed) < min(1, target / c(q)).

    Returns (keep per row, attributed query per row (-1 if dropped), rank = that pair's draw).
    A kept row is attributed to the rarest query whose draw succeeded.
    """
    offsets = np.asarray(offsets)
    q = np.asarray(qids, dtype=np.int64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    u = to_unit(pair_hash(uid64[rows], q, seed))
    c = counts[q].astype(np.float64)
    success = u * c < target  # u < target / c, and always true when c <= target
    key = np.where(success, rarest_key(q, counts), _I64_MAX)
    best = _row_min(key, offsets, _I64_MAX)
    keep = best != _I64_MAX
    attributed = np.where(keep, best % len(counts), -1)
    rank = np.where(keep, to_unit(pair_hash(uid64, np.maximum(attributed, 0), seed)), 1.0)
    return keep, attributed, rank


def metaclip_epsilon(target: float, delta: float = 1e-9) -> float:
    """ε with P(attributed(q) > target·(1+ε)) <= delta for every query, under MetaCLIP's rule.

    A query's attributed count is at most its number of successful draws, a sum of independent
    Bernoullis with mean min(c, target) <= target; Bernstein's inequality gives
    P(X >= mean + a) <= exp(-a² / (2(target + a/3))), solved here for a.

    >>> round(metaclip_epsilon(20000), 3)
    0.046
    """
    L = math.log(1.0 / delta)
    a = L / 3 + math.sqrt((L / 3) ** 2 + 2 * L * target)
    return a / target


def strict_quota(cap: int, oversample: float) -> int:
    """Pairs selected per query before download: floor(cap · oversample)."""
    return int(math.floor(cap * oversample + 1e-9))


def superset_fraction(attributed: np.ndarray, quota: int) -> np.ndarray:
    """Per query, a draw threshold that keeps ~quota + 8·sqrt(quota) + 16 of its attributed rows:
    the small superset spilled for the exact trim (1.0 = keep all)."""
    want = quota + 8.0 * math.sqrt(quota) + 16.0
    with np.errstate(divide="ignore"):
        return np.minimum(1.0, want / np.maximum(attributed, 1))


def kth_smallest_per_query(qids: np.ndarray, h: np.ndarray, uid64: np.ndarray, k: int, num_queries: int):
    """For each query, the k-th smallest (hash, uid) among its rows (the strict threshold).

    Returns (thr_hash, thr_uid, have) arrays of size num_queries; `have` = rows seen per query
    (a query with have < k gets the all-pass threshold (MAX, MAX)).
    """
    order = np.lexsort((uid64, h, qids))
    qs, hs, us = qids[order], h[order], uid64[order]
    have = np.bincount(qs, minlength=num_queries)
    first = np.concatenate([[0], np.cumsum(have)[:-1]])
    thr_h = np.full(num_queries, _U64_MAX, dtype=np.uint64)
    thr_u = np.full(num_queries, _U64_MAX, dtype=np.uint64)
    full = np.flatnonzero(have >= k)
    if len(full):
        at = first[full] + k - 1
        thr_h[full], thr_u[full] = hs[at], us[at]
    return thr_h, thr_u, have


def within_threshold(h: np.ndarray, uid64: np.ndarray, thr_h: np.ndarray, thr_u: np.ndarray) -> np.ndarray:
    """(h, uid) <= (thr_h, thr_u), lexicographically, elementwise."""
    return (h < thr_h) | ((h == thr_h) & (uid64 <= thr_u))
