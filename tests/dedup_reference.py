"""In-memory reference for the filter stage's global dedup (`wit_builder.filters.dedup_global`,
out of core with DuckDB): the same rule over every row at once in numpy. Tests compare the two;
benchmarks/bench_dedup.py measures them side by side. Not part of the package.

Near-duplicate search uses the pigeonhole trick (`wit_builder.filters.dedup.bands`): split the
64 bits into `max_distance + 1` bands; two hashes within `max_distance` bits agree exactly on at
least one band, so only hashes sharing a band value are compared. Identical hashes are collapsed
first, so a flood of blank images costs one comparison group, not n². Time grows with the sum of
squared band-bucket sizes: with 1M distinct random hashes on one core, ~3 s at distance 0-4 and
~50 s at 6.

Example:
    >>> uids = np.array([3, 1, 2, 4], dtype=np.uint64)
    >>> sha = ["a", "a", "b", "c"]
    >>> ph = np.array([0b1111, 0b1111, 0b1110, 0xFFFF0000], dtype=np.uint64)
    >>> exact, near = find_duplicates(uids, sha, ph, max_distance=1)
    >>> exact.tolist(), near.tolist()   # uid 3 is uid 1's byte copy; uid 2 is 1 bit from uid 1
    ([True, False, False, False], [False, False, True, False])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit_builder.filters.dedup import bands


def hamming(a: int, b: int) -> int:
    """Number of differing bits.

    >>> hamming(0b1010, 0b0011)
    2
    """
    return (a ^ b).bit_count()


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def near_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> np.ndarray:
    """All index pairs (i, j), i < j, of distinct `hashes` within `max_distance` bits; shape (m, 2).

    >>> near_pairs(np.array([0, 1, 3, 255], dtype=np.uint64), 1).tolist()
    [[0, 1], [1, 2]]
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found: list[np.ndarray] = []
    for shift, width in bands(max_distance):
        mask = np.uint64((1 << width) - 1)
        keys = (hashes >> np.uint64(shift)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = np.sort(order[s:e])
            hm = hashes[members]
            for b0 in range(0, len(members), block):
                dist = _popcount(hm[b0 : b0 + block, None] ^ hm[None, :])
                ii, jj = np.nonzero(dist <= max_distance)
                ii = ii + b0
                keep = ii < jj
                if keep.any():
                    found.append(np.stack([members[ii[keep]], members[jj[keep]]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def find_duplicates(
    uids: np.ndarray, sha256: list[str] | pa.Array | pa.ChunkedArray, phashes: np.ndarray, max_distance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (exact, near) over the samples: which are duplicates of a smaller uid.

    Exact first: per sha256, every sample but the smallest uid is an exact duplicate. Then,
    among the rest, greedily in uid order: a sample is a near duplicate when its phash is within
    `max_distance` bits of a sample already kept (negative `max_distance` = near dedup off).
    `uids` must be unique integers (the hex uid as uint64 keeps their order).
    """
    uids = np.asarray(uids, dtype=np.uint64)
    n = len(uids)
    exact = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    if n == 0:
        return exact, near
    if isinstance(sha256, pa.ChunkedArray):
        sha = sha256.combine_chunks()
    elif isinstance(sha256, pa.Array):
        sha = sha256
    else:
        sha = pa.array(list(sha256), pa.string())
    order = pc.sort_indices(
        pa.table({"sha": sha, "uid": uids}), sort_keys=[("sha", "ascending"), ("uid", "ascending")]
    ).to_numpy()
    sorted_sha = sha.take(pa.array(order))
    same = pc.equal(sorted_sha[1:], sorted_sha[:-1]).fill_null(False).to_numpy(zero_copy_only=False)
    exact[order[np.r_[False, same]]] = True
    if max_distance < 0:
        return exact, near
    rest = np.flatnonzero(~exact)
    ph = np.asarray(phashes, dtype=np.uint64)[rest]
    order = np.lexsort((uids[rest], ph))  # by phash, then uid
    first = np.r_[True, ph[order][1:] != ph[order][:-1]]
    near[rest[order[~first]]] = True  # same phash as a smaller uid
    reps = rest[order[first]]  # one sample per distinct phash: its smallest uid
    reps = reps[np.argsort(uids[reps], kind="stable")]  # greedy order: smallest uid first
    if max_distance == 0 or len(reps) < 2:
        return exact, near
    pairs = near_pairs(np.asarray(phashes, dtype=np.uint64)[reps], max_distance)
    kept = np.ones(len(reps), dtype=bool)
    for i, j in pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))].tolist():  # by later index j
        if kept[i] and kept[j]:
            kept[j] = False
    near[reps[~kept]] = True
    # samples sharing a dropped representative's phash were already marked above
    return exact, near
