"""CLIP-score filtering with a tiny randomly initialised open_clip model from a local checkpoint."""

from __future__ import annotations

import io as _io
import json
import os

import numpy as np
import pytest

from fake_download import FakeSample, synthetic_jpeg, write_run
from wit_builder import io
from wit_builder.config import ConfigError, from_dict
from wit_builder.stages import filter as filter_stage
from wit_builder.stages.base import StageContext

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CAPTIONS = [
    "a red bicycle leaning against a wall",
    "two dogs playing in the snow",
    "a bowl of fresh fruit on a table",
    "a city street at night with lights",
    "an old church on a green hill",
    "children flying a kite on the beach",
    "a plate of pasta with tomato sauce",
    "a white cat sleeping on a sofa",
]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model name, checkpoint path, model config path) of a random tiny CLIP saved to disk."""
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("clip")
    cfg_path = os.path.join(d, "wb-tiny-clip.json")
    with open(cfg_path, "w") as f:
        json.dump(TINY, f)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("wb-tiny-clip")
    ckpt = os.path.join(d, "tiny.pt")
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return "wb-tiny-clip", ckpt, cfg_path


def _write(run_dir: str) -> list[FakeSample]:
    samples = [FakeSample(f"http://h/{i}.jpg", c, 0, synthetic_jpeg(i + 1)) for i, c in enumerate(CAPTIONS)]
    write_run(run_dir, samples, queries=["q"], shard_size=3)
    return samples


def _scores(run_dir: str) -> dict[str, tuple[float, str | None]]:
    out = {}
    for p in io.listdir(os.path.join(run_dir, "filtered"), ".parquet"):
        for r in io.read_parquet(p).to_pylist():
            out[r["uid"]] = (r["clip_score"], r["drop_reason"])
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_clip_score_column_and_threshold(ray_session, tiny_clip, tmp_path):
    name, ckpt, cfg_path = tiny_clip
    base = dict(
        clip_model=name,
        clip_checkpoint=ckpt,
        clip_model_config=cfg_path,
        clip_device="cpu",
        clip_batch_size=2,
        near_dedup_distance=-1,
        languages=[],
        workers=1,
    )
    ctx = lambda d: StageContext(run_dir=d, seed=0, num_cpus=2, progress=False)  # noqa: E731
    d1 = str(tmp_path / "score_only")
    samples = _write(d1)
    r1 = filter_stage.run(ctx(d1), filter_stage.Config(clip_min_score=-1.0, **base))
    scores = _scores(d1)
    assert r1.rows_out == len(samples) and "clip_score" not in r1.dropped
    values = np.array([scores[s.uid][0] for s in samples], dtype=np.float32)
    assert np.all(np.isfinite(values)) and np.all(np.abs(values) <= 1.0001)
    assert len(set(values.tolist())) == len(samples)  # a real forward pass per pair

    # the same model in this process gives the same scores
    from PIL import Image

    from wit_builder.filters.clip_score import ClipScorer

    scorer = ClipScorer(name, ckpt, cfg_path, device="cpu")
    direct = scorer.score([Image.open(_io.BytesIO(s.image)) for s in samples], [s.caption for s in samples])
    np.testing.assert_allclose(direct, values, atol=1e-5)

    threshold = float(np.median(values))
    d2 = str(tmp_path / "threshold")
    _write(d2)
    r2 = filter_stage.run(ctx(d2), filter_stage.Config(clip_min_score=threshold, **base))
    got = _scores(d2)
    for s, v in zip(samples, values):
        assert got[s.uid][1] == ("clip_score" if v < threshold else None)
    assert r2.dropped == {"clip_score": int((values < threshold).sum())}
    r2.check_accounting()


def test_unknown_clip_model_is_a_config_error(tmp_path):
    write_run(str(tmp_path), [FakeSample("http://h/a.jpg", CAPTIONS[0], 0, synthetic_jpeg(1))], queries=["q"])
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"")
    cfg = filter_stage.Config(clip_model="no-such-model", clip_checkpoint=str(ckpt))
    with pytest.raises(ConfigError, match="no-such-model"):
        filter_stage.run(StageContext(run_dir=str(tmp_path), progress=False), cfg)


def test_clip_checkpoint_must_be_a_local_file(tmp_path):
    with pytest.raises(ConfigError, match="clip_checkpoint"):
        from_dict(filter_stage.Config, {"clip_model": "ViT-B-32", "clip_checkpoint": ""}, "t [filter]")
    from wit_builder.filters.clip_score import ClipScorer

    with pytest.raises(FileNotFoundError, match="local file"):
        ClipScorer("ViT-B-32", str(tmp_path / "openai"))
