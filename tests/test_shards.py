"""The `shards` stage: post-filter trim to the cap, key order, manifest == tars == metadata,
byte-identical reruns, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from fake_download import FakeSample, synthetic_jpeg, write_run
from wit_builder import io, schema, tario
from wit_builder.stages import filter as filter_stage
from wit_builder.stages import shards as shards_stage
from wit_builder.stages.base import StageContext

QUERIES = ["bicycle", "harbour", "mountain", "lantern"]
CAP = 3


def _samples() -> list[FakeSample]:
    """Query 0: 7 kept-able pairs (over cap), query 1: 5 with 2 failed downloads (3 left = cap),
    query 2: 2 (under cap), query 3: 4 with one too-small image (3 left)."""
    out = []
    seed = 0

    def add(q: int, n: int, image=True, size=(120, 90)):
        nonlocal seed
        for _ in range(n):
            seed += 1
            out.append(
                FakeSample(
                    f"http://h/{q}/{seed}.jpg",
                    f"a photo of a {QUERIES[q]} number {seed}",
                    q,
                    synthetic_jpeg(seed, size) if image else None,
                    query_ids=sorted({q, (q + 1) % 4}),
                )
            )

    add(0, 7)
    add(1, 3)
    add(1, 2, image=False)
    add(2, 2)
    add(3, 3)
    add(3, 1, size=(20, 20))
    return out


FILTER = filter_stage.Config(languages=[], near_dedup_distance=-1)


def _ctx(run_dir: str, **kw) -> StageContext:
    return StageContext(run_dir=run_dir, seed=7, num_cpus=2, progress=False, config_hash="cafe0123", **kw)


@pytest.fixture
def filtered_run(ray_session, tmp_path):
    run_dir = str(tmp_path / "run")
    samples = _samples()
    write_run(run_dir, samples, queries=QUERIES, shard_size=4)
    result = filter_stage.run(_ctx(run_dir), FILTER)
    assert result.dropped == {"too_small": 1}
    return run_dir, samples


def _tar_members(path: str) -> list[tuple[str, bytes]]:
    return list(tario.read_tar(path))


@pytest.mark.timeout(180)
def test_manifest_tars_metadata_agree_and_trim_keeps_caps(filtered_run):
    run_dir, samples = filtered_run
    cfg = shards_stage.Config(samples_per_shard=4, cap=CAP)
    result = shards_stage.run(_ctx(run_dir), cfg)
    result.check_accounting()
    out = os.path.join(run_dir, "shards")
    manifest = io.read_json(os.path.join(out, "manifest.json"))
    assert manifest["config_hash"] == "cafe0123" and manifest["seed"] == 7 and manifest["tool_version"]

    # what is actually inside the tars
    keys_in_tars, images, metas = [], {}, {}
    for entry in manifest["tars"]:
        path = os.path.join(out, entry["path"])
        data = open(path, "rb").read()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        members = _tar_members(path)
        names = [n for n, _ in members]
        assert names == sorted(names)  # key order inside the tar
        keys = sorted({n.split(".")[0] for n in names})
        assert len(keys) == entry["samples"] <= cfg.samples_per_shard
        assert len(names) == 3 * len(keys)
        keys_in_tars += keys
        for n, b in members:
            key, ext = n.split(".")
            if ext == "jpg":
                images[key] = b
            elif ext == "json":
                metas[key] = json.loads(b)
    meta_rows = []
    for p in io.listdir(os.path.join(out, "metadata"), ".parquet"):
        t = io.read_parquet(p)
        assert t.schema.names[: len(schema.SHARD_SAMPLES)] == schema.SHARD_SAMPLES.names
        meta_rows += t.to_pylist()
    assert manifest["total_samples"] == len(keys_in_tars) == len(meta_rows) == result.rows_out
    assert manifest["total_bytes"] == sum(t["bytes"] for t in manifest["tars"])
    assert keys_in_tars == sorted(keys_in_tars)  # global key order across tars
    assert [r["key"] for r in meta_rows] == keys_in_tars

    # post-filter trim: every query at or under its cap, the smallest ranks kept
    by_uid = {s.uid: s for s in samples}
    import pyarrow.compute as pc

    sel = io.read_parquet(os.path.join(run_dir, "selected", "part-00000.parquet"))
    rank = dict(zip(sel["uid"].to_pylist(), sel["rank"].to_pylist()))
    kept_after_filter = {}
    for p in io.listdir(os.path.join(run_dir, "filtered"), ".parquet"):
        t = io.read_parquet(p)
        for u in t.filter(pc.is_null(t["drop_reason"]))["uid"].to_pylist():
            kept_after_filter.setdefault(by_uid[u].query_id, []).append(u)
    per_query = {}
    for r in meta_rows:
        per_query.setdefault(r["query_id"], []).append(r["uid"])
    for q, uids in kept_after_filter.items():
        want = sorted(uids, key=lambda u: (rank[u], u))[:CAP]
        assert sorted(per_query.get(q, [])) == sorted(want), q
        assert len(per_query.get(q, [])) <= CAP
    assert result.dropped == {"over_cap": 7 - CAP}
    assert result.rows_in == sum(len(v) for v in kept_after_filter.values())

    # each sample's members carry what the design says
    for r in meta_rows:
        s = by_uid[r["uid"]]
        assert images[r["key"]] == s.image
        m = metas[r["key"]]
        assert m["uid"] == s.uid and m["url"] == s.url and m["query_id"] == s.query_id
        assert m["query_text"] == QUERIES[s.query_id] == r["query_text"]
        assert m["query_ids"] == s.query_ids
        assert (m["width"], m["height"]) == (120, 90)
        assert m["sha256"] == hashlib.sha256(s.image).hexdigest()
        assert "clip_score" not in m  # not computed by this filter config
        assert r["tar"] in {t["path"] for t in manifest["tars"]}


@pytest.mark.timeout(180)
def test_rerun_is_byte_identical_and_resumes(filtered_run, tmp_path):
    run_dir, _ = filtered_run
    cfg = shards_stage.Config(samples_per_shard=3, cap=CAP)
    out = os.path.join(run_dir, "shards")
    shards_stage.run(_ctx(run_dir), cfg)
    first = {
        n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith((".tar", ".json"))
    }
    assert len(first) >= 4

    shutil.rmtree(out)  # a fresh run
    shards_stage.run(_ctx(run_dir), cfg)
    second = {
        n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith((".tar", ".json"))
    }
    assert second == first

    os.remove(os.path.join(out, "000001.tar"))  # a crash while tar 1 was being written: no marker yet
    os.remove(os.path.join(out, "_parts", "write", "000001.json"))
    stale = os.path.join(out, ".000001.tar.deadbeef.tmp")
    open(stale, "wb").write(b"half a tar")
    before = os.stat(os.path.join(out, "000000.tar")).st_mtime_ns
    shards_stage.run(_ctx(run_dir), cfg)
    third = {
        n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith((".tar", ".json"))
    }
    assert third == first
    assert os.stat(os.path.join(out, "000000.tar")).st_mtime_ns == before  # not rewritten
    assert not os.path.exists(stale)


@pytest.mark.timeout(120)
def test_no_trim_and_own_cap(filtered_run):
    run_dir, _ = filtered_run
    result = shards_stage.run(_ctx(run_dir), shards_stage.Config(trim_to_cap=False, samples_per_shard=100))
    assert result.dropped == {"over_cap": 0} and result.rows_out == result.rows_in
    shutil.rmtree(os.path.join(run_dir, "shards"))
    result = shards_stage.run(_ctx(run_dir), shards_stage.Config(cap=1, samples_per_shard=100))
    assert result.rows_out == len(QUERIES)  # every query has >= 1 kept sample, each trimmed to 1
    assert result.dropped["over_cap"] == result.rows_in - len(QUERIES)


def test_cap_zero_means_the_balance_cap():
    from wit_builder.config import RunConfig
    from wit_builder.pipeline import Pipeline
    from wit_builder.stages.registry import config_class

    stages = {name: config_class(name)() for name in ("queries", "candidates", "match", "download", "filter")}
    stages["balance"] = config_class("balance")(cap=42)
    stages["shards"] = shards_stage.Config()
    pipeline = Pipeline(source="x.toml", run=RunConfig(), stages=stages, train={})
    assert pipeline.config_for("shards").cap == 42
    pipeline.stages["shards"] = shards_stage.Config(cap=7)
    assert pipeline.config_for("shards").cap == 7


@pytest.mark.timeout(120)
def test_webdataset_reads_the_tars(filtered_run):
    import webdataset as wds

    run_dir, _ = filtered_run
    shards_stage.run(_ctx(run_dir), shards_stage.Config(samples_per_shard=5, cap=CAP))
    out = os.path.join(run_dir, "shards")
    manifest = io.read_json(os.path.join(out, "manifest.json"))
    urls = [os.path.join(out, t["path"]) for t in manifest["tars"]]
    seen = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(seen) == manifest["total_samples"]
    for key, img, txt, meta in seen:
        assert meta["uid"] == key and img.size == (120, 90) and txt.startswith("a photo of a")


@pytest.mark.timeout(120)
def test_shards_reads_only_its_direct_inputs(filtered_run):
    """Rank and query text come in the download rows: selected/ and queries/ are not read."""
    run_dir, _ = filtered_run
    shards_stage.run(_ctx(run_dir), shards_stage.Config(samples_per_shard=100, cap=CAP))
    before = open(os.path.join(run_dir, "shards", "000000.tar"), "rb").read()
    shutil.rmtree(os.path.join(run_dir, "shards"))
    shutil.rmtree(os.path.join(run_dir, "selected"))
    shutil.rmtree(os.path.join(run_dir, "queries"))
    shards_stage.run(_ctx(run_dir), shards_stage.Config(samples_per_shard=100, cap=CAP))
    assert open(os.path.join(run_dir, "shards", "000000.tar"), "rb").read() == before


def test_open_files_lru_closes_the_oldest(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * 4)
        paths.append(str(p))
    lru = shards_stage._OpenFiles(2)
    first = lru.get(paths[0])
    lru.get(paths[1])
    assert lru.get(paths[0]) is first  # a hit keeps the handle
    lru.get(paths[2])  # evicts paths[1], the least recently used
    assert list(lru.files) == [paths[0], paths[2]]
    assert lru.get(paths[1]).read(1) == b"\x01"  # reopened on demand
    lru.close()
    assert first.closed and not lru.files


def test_cut_regroups_batches_into_fixed_size_tables():
    import pyarrow as pa

    batches = [pa.record_batch({"x": list(range(a, b))}) for a, b in ((0, 3), (3, 8), (8, 10))]
    tables = list(shards_stage._cut(batches, 4))
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert sum((t["x"].to_pylist() for t in tables), []) == list(range(10))


@pytest.mark.timeout(120)
def test_kept_sample_missing_from_its_download_tar_is_counted(filtered_run):
    run_dir, _ = filtered_run
    tar_path = os.path.join(run_dir, "download", "00000.tar")
    members = _tar_members(tar_path)
    victim = next(n for n, _ in members if n.endswith(".jpg")).split(".")[0]
    with tario.TarWriter(tar_path) as out:  # the download tar changed after filtering
        for name, data in members:
            if not name.startswith(victim):
                out.add(name, data)
    result = shards_stage.run(_ctx(run_dir), shards_stage.Config(trim_to_cap=False))
    result.check_accounting()
    assert result.dropped["missing_image"] == 1
    meta = io.read_parquet(os.path.join(run_dir, "shards", "metadata", "000000.parquet"))
    assert victim not in meta["key"].to_pylist()


@pytest.mark.timeout(120)
def test_other_image_formats_keep_their_extension(ray_session, tmp_path):
    import io as _io

    from fake_download import synthetic_image

    def png(seed: int) -> bytes:
        buf = _io.BytesIO()
        synthetic_image(seed).save(buf, "PNG")
        return buf.getvalue()

    run_dir = str(tmp_path)
    samples = [FakeSample(f"http://h/{i}.png", f"a drawing of a lantern number {i}", 3, png(i)) for i in range(4)]
    write_run(run_dir, samples, queries=QUERIES, image_ext="png")
    filter_stage.run(_ctx(run_dir), FILTER)
    result = shards_stage.run(_ctx(run_dir), shards_stage.Config(cap=CAP))
    names = [n for n, _ in _tar_members(os.path.join(run_dir, "shards", "000000.tar"))]
    assert result.rows_out == CAP and sum(n.endswith(".png") for n in names) == CAP
    images = {
        n.split(".")[0]: b for n, b in _tar_members(os.path.join(run_dir, "shards", "000000.tar")) if n.endswith(".png")
    }
    assert all(images[s.uid] == s.image for s in samples if s.uid in images)
