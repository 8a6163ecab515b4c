"""The `filter` stage: every drop reason, global dedup (smallest uid wins), accounting, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dedup_reference import find_duplicates, hamming
from fake_download import FakeSample, jpeg_bytes, synthetic_image, synthetic_jpeg, write_run
from wit_builder import io, schema
from wit_builder.config import ConfigError, from_dict
from wit_builder.filters.dedup import phash_bytes
from wit_builder.stages import filter as filter_stage
from wit_builder.stages.base import StageContext

EN = "a small wooden boat on a quiet lake"


def _samples() -> dict[str, FakeSample]:
    """Named samples, one per behaviour; duplicate pairs share an image."""
    base = synthetic_image(100, (200, 150))
    s = {
        "good1": FakeSample("http://h/good1.jpg", "a red bicycle leaning against a wall", 0, synthetic_jpeg(1)),
        "good2": FakeSample("http://h/good2.jpg", "two dogs playing in the snow", 1, synthetic_jpeg(2)),
        "small": FakeSample("http://h/small.jpg", EN, 0, synthetic_jpeg(3, (40, 40))),
        "wide": FakeSample("http://h/wide.jpg", EN, 0, synthetic_jpeg(4, (400, 100))),
        "short": FakeSample("http://h/short.jpg", "boat", 0, synthetic_jpeg(5)),
        "german": FakeSample(
            "http://h/de.jpg", "ein kleines Holzboot auf einem ruhigen See im Wald", 0, synthetic_jpeg(6)
        ),
        "failed": FakeSample("http://h/404.jpg", EN, 0, None),
        "exact_a": FakeSample("http://h/ex_a.jpg", "a lighthouse on a rocky coast", 1, jpeg_bytes(base)),
        "exact_b": FakeSample("http://h/ex_b.jpg", "a lighthouse on a rocky coast at dusk", 1, jpeg_bytes(base)),
        "near_a": FakeSample("http://h/near_a.jpg", "a green field under a blue sky", 2, synthetic_jpeg(7, (200, 150))),
        "near_b": FakeSample(
            "http://h/near_b.jpg",
            "green fields and the blue sky",
            2,
            jpeg_bytes(synthetic_image(7, (200, 150)).resize((150, 112)), quality=60),
        ),
        "bad_bytes": FakeSample("http://h/bad.jpg", EN, 0, synthetic_jpeg(8)[:200]),
    }
    return s


def _ctx(run_dir: str, **kw) -> StageContext:
    return StageContext(run_dir=run_dir, seed=0, num_cpus=2, progress=False, **kw)


def _by_uid(run_dir: str) -> dict[str, dict]:
    rows = {}
    for p in io.listdir(os.path.join(run_dir, "filtered"), ".parquet"):
        t = io.read_parquet(p)
        assert t.schema.names[:4] == schema.FILTERED.names
        for r in t.to_pylist():
            assert r["uid"] not in rows
            rows[r["uid"]] = r
    return rows


@pytest.fixture
def fake_run(tmp_path):
    samples = _samples()
    # the truncated file would already fail in download; make its parquet say success anyway
    write_run(str(tmp_path), list(samples.values()), queries=["bike", "dog", "field"], shard_size=3)
    return str(tmp_path), samples


@pytest.mark.timeout(120)
def test_every_reason_and_accounting(ray_session, fake_run):
    run_dir, s = fake_run
    assert hamming(phash_bytes(s["near_a"].image), phash_bytes(s["near_b"].image)) <= 4
    assert s["near_a"].image != s["near_b"].image
    result = filter_stage.run(_ctx(run_dir), filter_stage.Config())
    result.check_accounting()
    rows = _by_uid(run_dir)
    assert result.rows_in == len(rows) == len(s) - 1  # every successful download, no failed one
    assert s["failed"].uid not in rows
    reason = {name: rows[smp.uid]["drop_reason"] for name, smp in s.items() if smp.uid in rows}
    assert reason["good1"] is None and reason["good2"] is None
    assert reason["small"] == "too_small"
    assert reason["wide"] == "bad_aspect"
    assert reason["short"] == "caption_short"
    assert reason["german"] == "language"
    assert reason["bad_bytes"] == "decode_error"
    assert rows[s["german"].uid]["lang"] == "de"
    # smallest uid of each duplicate pair wins
    for a, b, why in (("exact_a", "exact_b", "duplicate_exact"), ("near_a", "near_b", "duplicate_near")):
        winner, loser = sorted([a, b], key=lambda n: s[n].uid)
        assert reason[winner] is None, (a, b)
        assert reason[loser] == why, (a, b)
    kept = sum(r is None for r in reason.values())
    assert result.rows_out == kept
    assert result.dropped == {k: sum(v == k for v in reason.values()) for k in set(reason.values()) if k is not None}
    assert rows[s["good1"].uid]["phash"] is not None


@pytest.mark.timeout(120)
def test_dedup_is_global_and_independent_of_sharding(ray_session, tmp_path):
    samples = list(_samples().values())
    out = []
    for shard_size, order in ((2, samples), (5, samples[::-1])):
        d = str(tmp_path / f"r{shard_size}")
        write_run(d, order, queries=["bike", "dog", "field"], shard_size=shard_size)
        filter_stage.run(_ctx(d), filter_stage.Config())
        out.append({u: r["drop_reason"] for u, r in _by_uid(d).items()})
    assert out[0] == out[1]


@pytest.mark.timeout(120)
def test_rerun_skips_finished_shards_and_redoes_missing(ray_session, fake_run):
    run_dir, _ = fake_run
    first = filter_stage.run(_ctx(run_dir), filter_stage.Config())
    paths = io.listdir(os.path.join(run_dir, "filtered"), ".parquet")
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    os.remove(paths[1])  # a crash while this shard was being written: its marker not written yet
    os.remove(os.path.join(run_dir, "filtered", "_parts", "write", "00001.json"))
    stale = os.path.join(run_dir, "filtered", ".00001.parquet.0badf00d.tmp")
    open(stale, "wb").write(b"half a file")
    second = filter_stage.run(_ctx(run_dir), filter_stage.Config())
    assert second.to_json() == first.to_json()
    assert os.path.exists(paths[1])
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in paths if p != paths[1])
    assert not os.path.exists(stale)


def test_checks_off_keeps_everything_that_decodes(ray_session, fake_run):
    run_dir, s = fake_run
    cfg = filter_stage.Config(
        min_width=0,
        min_height=0,
        max_aspect_ratio=0,
        min_caption_words=0,
        min_caption_chars=0,
        languages=[],
        exact_dedup=False,
        near_dedup_distance=-1,
    )
    result = filter_stage.run(_ctx(run_dir), cfg)
    assert result.dropped == {"decode_error": 1}
    assert result.rows_out == len(s) - 2


def test_config_errors():
    with pytest.raises(ConfigError, match="near_dedup_distance"):
        from_dict(filter_stage.Config, {"near_dedup_distance": 40}, "t [filter]")
    with pytest.raises(ConfigError, match="clip_checkpoint"):
        from_dict(filter_stage.Config, {"clip_model": "ViT-B-32"}, "t [filter]")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(filter_stage.Config, {"min_widht": 3}, "t [filter]")


def test_unknown_language_code_is_a_config_error(tmp_path):
    write_run(str(tmp_path), [FakeSample("http://h/a.jpg", EN, 0, synthetic_jpeg(1))], queries=["q"])
    with pytest.raises(ConfigError, match="'languages'.*xx"):
        filter_stage.run(_ctx(str(tmp_path)), filter_stage.Config(languages=["en", "xx"]))
    with pytest.raises(ConfigError, match="'language_candidates'.*yy"):
        filter_stage.run(_ctx(str(tmp_path)), filter_stage.Config(language_candidates=["en", "yy"]))


def test_default_language_rule_keeps_english_that_the_full_model_calls_pidgin():
    from wit_builder.filters.language import LanguageId, is_other_language

    caption = "a plate of pasta with tomato sauce"
    cfg = filter_stage.Config()
    lang, prob = LanguageId().detect(caption)  # all 140 languages
    assert lang != "en" and is_other_language(lang, prob, ["en"], 0.0)  # the naive rule drops it
    lang, prob = LanguageId(cfg.candidates).detect(caption)
    assert not is_other_language(lang, prob, cfg.languages, cfg.language_min_confidence)
    lang, prob = LanguageId(cfg.candidates).detect("Roos en Lieke in de bus naar Amsterdam voor de verjaardag")
    assert lang == "nl" and is_other_language(lang, prob, cfg.languages, cfg.language_min_confidence)


def _greedy_reference(uids, sha, ph, d):
    """O(n^2) statement of the rule: in uid order, exact dup of any earlier passing sample by sha,
    else near dup of any earlier KEPT sample within d bits."""
    order = np.argsort(uids)
    exact = np.zeros(len(uids), bool)
    near = np.zeros(len(uids), bool)
    seen_sha, kept = set(), []
    for i in order:
        if sha[i] in seen_sha:
            exact[i] = True
            continue
        seen_sha.add(sha[i])
        if d >= 0 and any(hamming(int(ph[i]), int(ph[k])) <= d for k in kept):
            near[i] = True
            continue
        kept.append(i)
    return exact, near


@pytest.mark.parametrize("d", [-1, 0, 1, 3, 6])
def test_find_duplicates_matches_the_greedy_rule(d):
    rng = np.random.default_rng(d + 10)
    n = 400
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    ph = base[rng.integers(0, 40, n)]
    flips = rng.integers(0, 64, (n, 3))
    for j in range(3):  # a few bits flipped, sometimes
        flip = (rng.random(n) < 0.5).astype(np.uint64) << flips[:, j].astype(np.uint64)
        ph = ph ^ flip
    uids = rng.permutation(np.arange(n, dtype=np.uint64) * 977 + 5)
    sha = [str(x) for x in rng.integers(0, n // 2, n)]
    got = find_duplicates(uids, sha, ph, d)
    want = _greedy_reference(uids, sha, ph, d)
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1])
    assert got[1].sum() > 0 or d < 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_distance", [-1, 0, 1, 4])
def test_out_of_core_dedup_equals_the_in_memory_reference(tmp_path, max_distance):
    """DuckDB's dedup over several feature files (tight memory limit) decides exactly what
    find_duplicates decides over all rows at once, per-sample reasons and null sha256 included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from wit_builder.filters.dedup_global import duplicate_marks

    rng = np.random.default_rng(max_distance + 10)
    n = 20_000
    uids = rng.choice(1 << 40, size=n, replace=False).astype(np.uint64)
    hex_uids = [f"{int(u):016x}" for u in uids]
    sha = [None if rng.random() < 0.02 else f"s{rng.integers(0, n // 2)}" for _ in range(n)]
    base = rng.integers(0, 1 << 63, size=n // 20, dtype=np.uint64)  # clusters of near images
    flips = [np.uint64(1 << int(b)) for b in rng.integers(0, 64, size=n)]
    ph = np.array(
        [base[rng.integers(0, len(base))] ^ (flips[i] if rng.random() < 0.5 else np.uint64(0)) for i in range(n)],
        dtype=np.uint64,
    )
    reason = [("too_small" if rng.random() < 0.1 else None) for _ in range(n)]
    paths = []
    for k, (a, b) in enumerate([(0, 7000), (7000, 7001), (7001, 15000), (15000, n)]):
        path = str(tmp_path / f"{k:05d}.parquet")
        pq.write_table(
            pa.table(
                {
                    "uid": hex_uids[a:b],
                    "reason": reason[a:b],
                    "sha256": sha[a:b],
                    "phash": pa.array(ph[a:b], pa.uint64()),
                }
            ),
            path,
        )
        paths.append(path)
    marks = list(
        duplicate_marks(paths, exact=True, max_distance=max_distance, tmp_dir=str(tmp_path), memory_limit="64MB")
    )
    assert marks == sorted(marks)
    got = {uid: r for _, uid, r in marks}
    eligible = [i for i in range(n) if reason[i] is None]
    sub_sha = [sha[i] if sha[i] is not None else hex_uids[i] for i in eligible]
    exact, near = find_duplicates(uids[eligible], sub_sha, ph[eligible], max_distance)
    want = {hex_uids[i]: "duplicate_exact" for i, e in zip(eligible, exact) if e}
    want.update({hex_uids[i]: "duplicate_near" for i, e in zip(eligible, near) if e})
    assert got == want
    near_count = sum(r == "duplicate_near" for r in want.values())
    assert near_count == 0 if max_distance < 0 else near_count > 100
    assert sum(r == "duplicate_exact" for r in want.values()) > 1000
    files = {uid: fi for fi, uid, _ in marks}
    for fi, (a, b) in enumerate([(0, 7000), (7000, 7001), (7001, 15000), (15000, n)]):
        assert all(files[u] == fi for u in hex_uids[a:b] if u in files)
