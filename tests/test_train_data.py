"""Trainer data: the manifest checks, the sample-level split, resumable epoch streams, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from synthetic_shards import write_shards
from wit_builder.train import data as tdata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return write_shards(str(folder), samples=60, tars=3, image_size=16)


def _all_keys(manifest_path: str) -> list[str]:
    m = tdata.load_manifest(manifest_path)
    return [k for k, _ in tdata.iter_samples(m, None)]


def _spec(manifest_path, rank=0, world=1, workers=1, epoch=0, start=None, holdout=0.0, chunk=4):
    m = tdata.load_manifest(manifest_path)
    return tdata.EpochSpec(
        [s.url for s in m.shards], rank, world, workers, epoch, 7, 8, holdout, chunk, start or [0] * workers
    )


def _tok(captions):
    return torch.zeros(len(captions), 4, dtype=torch.long)


def _tf(im):
    return torch.zeros(3, 4, 4)


def test_manifest_is_read_and_checked(shards):
    m = tdata.load_manifest(shards)
    assert m.total_samples == 60 and len(m.shards) == 3
    assert tdata.load_manifest(shards, verify_sha256=True).total_samples == 60


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_manifest", "manifest not found"),
        ("not_json", "not valid JSON"),
        ("no_tars", "'tars' list"),
        ("missing_shard", "not found"),
        ("wrong_size", "bytes on disk"),
        ("bad_sha", "sha256 differs"),
    ],
)
def test_bad_manifest_or_missing_shard_is_a_clear_error(shards, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(os.path.dirname(shards), folder)
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    if damage == "missing_manifest":
        path.unlink()
    elif damage == "not_json":
        path.write_text("{not json")
    elif damage == "no_tars":
        path.write_text(json.dumps({"total_samples": 3}))
    elif damage == "missing_shard":
        (folder / raw["tars"][1]["path"]).unlink()
    elif damage == "wrong_size":
        raw["tars"][0]["bytes"] += 1
        path.write_text(json.dumps(raw))
    elif damage == "bad_sha":
        raw["tars"][0]["sha256"] = "0" * 64
        path.write_text(json.dumps(raw))
    with pytest.raises(tdata.DataError, match=message):
        tdata.load_manifest(str(path), verify_sha256=True)


def test_cli_reports_a_missing_shard_without_traceback(shards, tmp_path):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(os.path.dirname(shards), folder)
    os.unlink(folder / "000002.tar")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wit_builder.train",
            "--config",
            os.path.join(REPO, "pipelines", "train-tiny.toml"),
            "--data",
            str(folder / "manifest.json"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "shard" in proc.stderr and "000002.tar" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_rejects_an_unknown_config_key(shards, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wit_builder.train",
            "--data",
            shards,
            "--out",
            str(tmp_path),
            "--set",
            "optim.learning_rate=1e-3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'learning_rate'" in proc.stderr and "Traceback" not in proc.stderr


def test_every_key_lands_in_exactly_one_slot_even_from_one_shard(tmp_path):
    one = write_shards(str(tmp_path), samples=40, tars=1, image_size=8)
    urls = [s.url for s in tdata.load_manifest(one).shards]
    seen = Counter()
    per_slot = []
    for slot in range(6):  # 3 ranks x 2 workers
        keys = [k for k, _ in tdata.slot_stream(urls, slot, 6, epoch=0, seed=1, buffer=5, holdout=0.0)]
        per_slot.append(len(keys))
        seen.update(keys)
    assert set(seen) == set(_all_keys(one)) and set(seen.values()) == {1}
    assert all(n > 0 for n in per_slot)  # one shard feeds every slot


def test_stream_is_shuffled_per_epoch_and_deterministic(shards):
    urls = [s.url for s in tdata.load_manifest(shards).shards]
    a = [k for k, _ in tdata.slot_stream(urls, 0, 1, 0, 1, 8, 0.0)]
    b = [k for k, _ in tdata.slot_stream(urls, 0, 1, 0, 1, 8, 0.0)]
    c = [k for k, _ in tdata.slot_stream(urls, 0, 1, 1, 1, 8, 0.0)]
    assert a == b and sorted(a) == sorted(c) and a != c


def test_holdout_keys_never_reach_training(shards):
    urls = [s.url for s in tdata.load_manifest(shards).shards]
    trained = {k for k, _ in tdata.slot_stream(urls, 0, 1, 0, 1, 8, 0.3)}
    held = {k for k, _ in tdata.iter_samples(tdata.load_manifest(shards), 0.3)}
    assert held and trained and not trained & held
    assert trained | held == set(_all_keys(shards))


@pytest.mark.timeout(120)
def test_resumed_epoch_neither_repeats_nor_skips(shards):
    """Two workers; stop after 3 batches, resume from the recorded positions: same key multiset."""
    full = [k for b in tdata.epoch_batches(_spec(shards, workers=2), _tf, _tok, 7, 2) for k in b.keys]
    assert sorted(full) == sorted(_all_keys(shards))
    first, positions = [], None
    for i, b in enumerate(tdata.epoch_batches(_spec(shards, workers=2), _tf, _tok, 7, 2)):
        first += b.keys
        positions = b.positions
        if i == 2:
            break
    rest = [k for b in tdata.epoch_batches(_spec(shards, workers=2, start=positions), _tf, _tok, 7, 2) for k in b.keys]
    assert len(first) == 21
    assert Counter(first + rest) == Counter(full)


def test_batches_are_exact_size_except_the_last(shards):
    sizes = [b.rows for b in tdata.epoch_batches(_spec(shards), _tf, _tok, 7, 0)]
    assert sizes == [7] * 8 + [4]


def test_a_corrupt_sample_is_skipped_with_a_warning(tmp_path, caplog):
    from synthetic_shards import shape_samples, write_tars

    samples = shape_samples(5, 8)
    samples[2] = (samples[2][0], b"not a jpeg", samples[2][2])
    path = write_tars(str(tmp_path), samples, 1)
    keys = [k for b in tdata.epoch_batches(_spec(path), _tf, _tok, 10, 0) for k in b.keys]
    assert sorted(keys) == sorted(k for k, _, _ in samples if k != samples[2][0])
    assert "skipped" in caplog.text


def test_a_truncated_tar_yields_its_readable_samples_with_a_warning(tmp_path, caplog):
    write_shards(str(tmp_path), samples=10, tars=1, image_size=8)
    tar = tmp_path / "000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    keys = [k for k, _ in tdata.slot_stream([str(tar)], 0, 1, 0, 0, 4, 0.0)]
    assert 0 < len(keys) < 10 and len(set(keys)) == len(keys)
    assert "rest of shard skipped" in caplog.text


def test_paths_set_on_the_command_line_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    from wit_builder.config import ConfigError
    from wit_builder.train.config import load_config

    (tmp_path / "zs").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(REPO, "pipelines", "train-tiny.toml"), ['eval.zeroshot_dir="zs"'])
    assert cfg.eval.zeroshot_dir == str(tmp_path / "zs")
    with pytest.raises(ConfigError, match="zeroshot_dir"):
        load_config(os.path.join(REPO, "pipelines", "train-tiny.toml"), ["eval.zeroshot_dir=missing"])


def test_a_tar_with_a_bad_header_yields_nothing_past_it_with_a_warning(tmp_path, caplog):
    """The reader's format errors (wit_builder.tario, tested in test_tario.py) become a warning."""
    path = write_shards(str(tmp_path), samples=4, tars=1, image_size=8)
    tar = tmp_path / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[10] ^= 0xFF  # damage the first header's name: checksum no longer matches
    tar.write_bytes(bytes(data))
    assert list(tdata.iter_samples(tdata.load_manifest(path))) == []
    assert "checksum" in caplog.text and "rest of shard skipped" in caplog.text
