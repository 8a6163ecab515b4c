"""Balancing: strict caps exact and never exceeded, MetaCLIP's rule vs a per-pair reference,
the same selection whatever the block/part layout, the stage's outputs and config checks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_builder import balancing, schema
from wit_builder.config import ConfigError, from_dict
from wit_builder.stages import balance
from wit_builder.stages.base import StageContext


def zipf_rows(n_rows: int, n_queries: int, seed: int = 1):
    """Synthetic matched rows: 1-4 Zipf-distributed query ids each, unique random uids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, n_rows)
    qids = np.minimum(rng.zipf(1.3, int(lengths.sum())) - 1, n_queries - 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lists = [sorted(set(qids[a:b].tolist())) for a, b in zip(offsets[:-1], offsets[1:])]
    uids = np.unique(rng.integers(0, 2**63, n_rows + 100, dtype=np.int64).astype(np.uint64))[:n_rows]
    rng.shuffle(uids)
    return [f"{u:016x}" for u in uids.tolist()], lists


def csr(lists):
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return offsets, np.fromiter((q for x in lists for q in x), dtype=np.int64, count=int(offsets[-1]))


# ------------------------------------------------------------------------- the numpy core


def test_uid_parsing_and_hash_are_stable():
    u = balancing.uids_to_u64(pa.array(["0123456789abcdef", "ffffffffffffffff"]).slice(1))
    assert u.tolist() == [2**64 - 1]
    h1 = balancing.pair_hash(np.array([5], np.uint64), np.array([3]), seed=0)
    h2 = balancing.pair_hash(np.array([5], np.uint64), np.array([3]), seed=1)
    assert h1[0] != h2[0]
    assert 0.0 <= balancing.to_unit(h1)[0] < 1.0
    with pytest.raises(ValueError):
        balancing.uids_to_u64(["abc"])


def test_draws_are_uniform():
    u = balancing.to_unit(balancing.pair_hash(np.arange(200_000, dtype=np.uint64), np.zeros(200_000), 7))
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 20_000) < 5 * math.sqrt(20_000))


def reference_metaclip(uids, lists, counts, target, seed):
    """MetaCLIP's rule, one pair at a time."""
    keep, attributed = [], []
    for u, qs in zip(uids, lists):
        u64 = balancing.uids_to_u64([u])
        ok = [
            q
            for q in qs
            if balancing.to_unit(balancing.pair_hash(u64, np.array([q]), seed))[0] < min(1.0, target / counts[q])
        ]
        keep.append(bool(ok))
        attributed.append(min(ok, key=lambda q: (counts[q], q)) if ok else -1)
    return keep, attributed


def test_metaclip_select_matches_per_pair_reference():
    uids, lists = zipf_rows(3000, 200)
    offsets, qids = csr(lists)
    counts = np.bincount(qids, minlength=200)
    keep, a, rank = balancing.metaclip_select(offsets, qids, balancing.uids_to_u64(uids), counts, 40.0, seed=3)
    ref_keep, ref_a = reference_metaclip(uids, lists, counts, 40.0, 3)
    assert keep.tolist() == ref_keep
    assert a.tolist() == ref_a
    assert np.all((rank[keep] >= 0) & (rank[keep] < 1))


def test_metaclip_keeps_every_tail_pair_and_stays_within_bound():
    t = 50.0
    uids, lists = zipf_rows(60_000, 2000)
    offsets, qids = csr(lists)
    counts = np.bincount(qids, minlength=2000)
    keep, a, _ = balancing.metaclip_select(offsets, qids, balancing.uids_to_u64(uids), counts, t, seed=0)
    has_tail = np.array([any(counts[q] <= t for q in x) for x in lists])
    assert has_tail.sum() > 1000 and keep[has_tail].all()  # every row holding a tail query kept
    attributed = np.bincount(a[keep], minlength=2000)
    eps = balancing.metaclip_epsilon(t)
    assert attributed.max() <= t * (1 + eps)
    assert (counts > t).sum() > 20 and attributed[counts > t].max() > 0.8 * t  # heads are sampled ~t


def test_epsilon_is_stated_and_shrinks_with_the_cap():
    assert balancing.metaclip_epsilon(20_000) < 0.05
    assert balancing.metaclip_epsilon(5) > balancing.metaclip_epsilon(500) > balancing.metaclip_epsilon(20_000)


def test_attribution_picks_the_rarest_query_with_ties_by_lower_id():
    offsets, qids = np.array([0, 3, 5, 5]), np.array([0, 1, 2, 3, 4])
    counts = np.array([9, 4, 4, 7, 7])
    assert balancing.attribute_rarest(offsets, qids, counts).tolist() == [1, 3, -1]


# ------------------------------------------------------------------------------ the stage


def write_matched(run_dir, uids, lists, n_parts: int) -> None:
    d = run_dir / "matched"
    d.mkdir(parents=True)
    bounds = np.linspace(0, len(uids), n_parts + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        t = pa.table(
            {
                "uid": uids[lo:hi],
                "url": [f"https://x.org/{u}.jpg" for u in uids[lo:hi]],
                "caption": ["c"] * (hi - lo),
                "source_file": ["f"] * (hi - lo),
                "page_url": pa.nulls(hi - lo, pa.string()),
                "query_ids": pa.array(lists[lo:hi], schema.QUERY_IDS),
                "extra": list(range(lo, hi)),
            }
        )
        pq.write_table(t, d / f"part-{i:05d}.parquet")


def run_balance(tmp_path, name, uids, lists, n_parts, seed=0, **cfg):
    run_dir = tmp_path / name
    write_matched(run_dir, uids, lists, n_parts)
    ctx = StageContext(run_dir=str(run_dir), seed=seed, num_cpus=2, progress=False)
    result = balance.run(ctx, balance.Config(**cfg))
    sel = pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "selected").glob("part-*.parquet"))])
    counts = pq.read_table(run_dir / "selected" / "query_counts.parquet")
    return result, sel, counts


def _selection(sel):
    return sorted(
        zip(sel.column("uid").to_pylist(), sel.column("query_id").to_pylist(), sel.column("rank").to_pylist())
    )


@pytest.mark.timeout(120)
def test_strict_caps_exact_and_layout_independent(tmp_path, ray_session):
    uids, lists = zipf_rows(20_000, 500)
    cap = 30
    r1, s1, c1 = run_balance(tmp_path, "one", uids, lists, 1, cap=cap, batch_rows=100_000)
    r2, s2, c2 = run_balance(tmp_path, "many", uids, lists, 7, cap=cap, batch_rows=997)
    r1.check_accounting()
    assert _selection(s1) == _selection(s2)
    assert r1.rows_out == r2.rows_out == s1.num_rows
    assert c1.equals(c2)
    # brute-force reference: attribute each row to its rarest query, keep the `cap` smallest (hash, uid)
    offsets, qids = csr(lists)
    containing = np.bincount(qids, minlength=500)
    a = balancing.attribute_rarest(offsets, qids, containing)
    u64 = balancing.uids_to_u64(uids)
    h = balancing.pair_hash(u64, a, 0)
    expected = set()
    for q in np.unique(a):
        rows = np.flatnonzero(a == q)
        order = sorted(rows.tolist(), key=lambda i: (int(h[i]), int(u64[i])))
        expected.update(uids[i] for i in order[:cap])
    assert set(s1.column("uid").to_pylist()) == expected
    attributed = np.bincount(s1.column("query_id").to_numpy(), minlength=500)
    assert attributed.max() == cap  # never more, and the heads are full
    assert c1.column("attributed").to_numpy().tolist() == attributed.tolist()
    assert c1.column("containing").to_numpy().tolist() == containing.tolist()
    assert s1.schema.names[: len(schema.SELECTED.names)] == schema.SELECTED.names
    assert "extra" in s1.column_names
    assert r1.dropped == {"over_cap": 20_000 - s1.num_rows}


@pytest.mark.timeout(120)
def test_strict_oversample_and_seed(tmp_path, ray_session):
    uids, lists = zipf_rows(8000, 300)
    _, s1, _ = run_balance(tmp_path, "a", uids, lists, 3, cap=10, oversample=1.5)
    attributed = np.bincount(s1.column("query_id").to_numpy())
    assert attributed.max() == 15
    _, s2, _ = run_balance(tmp_path, "b", uids, lists, 3, seed=1, cap=10, oversample=1.5)
    assert _selection(s1) != _selection(s2)


@pytest.mark.timeout(120)
def test_metaclip_stage_layout_independent_and_bounded(tmp_path, ray_session):
    uids, lists = zipf_rows(20_000, 500)
    cap = 40
    r1, s1, c1 = run_balance(tmp_path, "one", uids, lists, 1, mode="metaclip", cap=cap)
    r2, s2, _ = run_balance(tmp_path, "many", uids, lists, 5, mode="metaclip", cap=cap, batch_rows=1234)
    assert _selection(s1) == _selection(s2)
    r1.check_accounting()
    attributed = c1.column("attributed").to_numpy()
    assert attributed.max() <= cap * (1 + r1.extra["epsilon"])
    containing = c1.column("containing").to_numpy()
    tail_rows = [u for u, x in zip(uids, lists) if any(containing[q] <= cap for q in x)]
    assert set(tail_rows) <= set(s1.column("uid").to_pylist())


def test_config_validation():
    with pytest.raises(ConfigError, match="cap must be > 0"):
        from_dict(balance.Config, {"cap": 0}, where="t.toml [balance]")
    with pytest.raises(ConfigError, match="oversample"):
        from_dict(balance.Config, {"oversample": 0.5}, where="t.toml [balance]")
    with pytest.raises(ConfigError, match="mode"):
        from_dict(balance.Config, {"mode": "fair"}, where="t.toml [balance]")
    assert from_dict(balance.Config, {"cap": 5}, where="t").mode == "strict"
