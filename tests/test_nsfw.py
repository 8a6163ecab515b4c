"""NSFW scoring on the filter's CLIP image embeddings: zero-shot prompts and LAION's MLP head
shape, with a tiny random open_clip model and heads built here (nothing downloaded)."""

from __future__ import annotations

import io as _io
import json
import os

import numpy as np
import pytest
import torch

from fake_download import FakeSample, synthetic_jpeg, write_run
from test_cli import DEMO, _wit
from test_filter_clip import CAPTIONS, tiny_clip  # noqa: F401  (the fixture)
from wit_builder import io
from wit_builder.config import ConfigError, from_dict
from wit_builder.filters.nsfw import LAYERS, MlpNsfw, NsfwHead, ZeroShotNsfw, load_head
from wit_builder.stages import filter as filter_stage
from wit_builder.stages.base import StageContext

DIM = 32  # the tiny CLIP's embedding size (test_filter_clip.TINY)


def _samples() -> list[FakeSample]:
    return [FakeSample(f"http://h/{i}.jpg", c, 0, synthetic_jpeg(i + 1)) for i, c in enumerate(CAPTIONS)]


def _embeddings(tiny) -> torch.Tensor:
    from PIL import Image

    from wit_builder.filters.clip_score import ClipScorer

    name, ckpt, cfg_path = tiny
    scorer = ClipScorer(name, ckpt, cfg_path, device="cpu")
    return scorer.embed_images([Image.open(_io.BytesIO(s.image)) for s in _samples()])


def _rows(run_dir: str) -> dict[str, dict]:
    out = {}
    for p in io.listdir(os.path.join(run_dir, "filtered"), ".parquet"):
        for r in io.read_parquet(p).to_pylist():
            out[r["uid"]] = r
    return out


def _run(run_dir: str, tiny, **kw):
    name, ckpt, cfg_path = tiny
    write_run(run_dir, _samples(), queries=["q"], shard_size=3)
    cfg = filter_stage.Config(
        clip_model=name,
        clip_checkpoint=ckpt,
        clip_model_config=cfg_path,
        clip_device="cpu",
        clip_batch_size=4,
        clip_min_score=-1.0,
        near_dedup_distance=-1,
        languages=[],
        workers=1,
        **kw,
    )
    return filter_stage.run(StageContext(run_dir=run_dir, seed=0, num_cpus=2, progress=False), cfg)


def _direction_head(v: torch.Tensor, t0: float, k: float = 20.0) -> dict[str, torch.Tensor]:
    """A head in LAION's layout whose output is exactly sigmoid(k * (x . v - t0)) for a unit x:
    layer 1 splits x . v into its positive and negative parts, layer 2 adds them back with an
    offset of 2 (so the ReLUs pass it), layer 3 copies, layer 4 scales and shifts."""
    head = NsfwHead(DIM)
    sd = {k_: torch.zeros_like(t) for k_, t in head.state_dict().items()}
    sd["norm.variance"] = torch.ones(DIM)
    sd["linear_1.weight"][0], sd["linear_1.weight"][1] = v, -v
    sd["linear_2.weight"][0, 0], sd["linear_2.weight"][0, 1], sd["linear_2.bias"][0] = 1.0, -1.0, 2.0
    sd["linear_3.weight"][0, 0] = 1.0
    sd["linear_4.weight"][0, 0], sd["linear_4.bias"][0] = k, -k * (2.0 + t0)
    return sd


def test_zero_shot_scores_are_probabilities_and_deterministic(tiny_clip):  # noqa: F811
    from wit_builder.filters.clip_score import ClipScorer

    name, ckpt, cfg_path = tiny_clip
    emb = _embeddings(tiny_clip)
    scorer = ClipScorer(name, ckpt, cfg_path, device="cpu")
    a = ZeroShotNsfw(scorer)(emb)
    b = ZeroShotNsfw(ClipScorer(name, ckpt, cfg_path, device="cpu"))(emb)
    assert a.dtype == np.float32 and a.shape == (len(CAPTIONS),)
    assert np.all((a >= 0) & (a <= 1)) and np.array_equal(a, b)
    assert len(set(a.tolist())) > 1  # a real forward pass per image
    one = ZeroShotNsfw(scorer, unsafe=["x"], safe=["y"])(emb)  # two prompts: mass on "x"
    text = scorer.embed_texts(["x", "y"])
    logits = ZeroShotNsfw(scorer).scale * torch.nn.functional.normalize(emb, dim=-1) @ text.T
    np.testing.assert_allclose(one, logits.softmax(-1)[:, 0].numpy(), atol=1e-6)


def test_head_loading_checks_layout_and_size(tmp_path):
    torch.manual_seed(0)
    good = tmp_path / "head.pt"
    torch.save({"state_dict": NsfwHead(DIM).state_dict()}, good)
    assert isinstance(load_head(str(good), DIM), NsfwHead)
    with pytest.raises(ValueError, match="takes 32-d embeddings, the CLIP model gives 768-d"):
        load_head(str(good), 768)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        load_head(str(bad), DIM)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in NsfwHead(DIM).state_dict().items() if not k.startswith("linear_4")}, partial)
    with pytest.raises(ValueError, match="missing linear_4.bias, linear_4.weight"):
        load_head(str(partial), DIM)
    wide = tmp_path / "wide.pt"  # other hidden widths load too
    torch.save(NsfwHead(DIM, (8, 16, 4)).state_dict(), wide)
    assert load_head(str(wide), DIM).linear_2.out_features == 16


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mlp_head_drops_exactly_the_samples_above_threshold(ray_session, tiny_clip, tmp_path):  # noqa: F811
    emb = torch.nn.functional.normalize(_embeddings(tiny_clip), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(3)), dim=0)
    proj = (emb @ v).numpy()
    t0 = float(np.median(proj))
    head_path = tmp_path / "head.pt"
    torch.save(_direction_head(v, t0), head_path)
    expected = 1 / (1 + np.exp(-20.0 * (proj - t0)))
    res = _run(str(tmp_path / "run"), tiny_clip, nsfw="mlp", nsfw_head=str(head_path), nsfw_threshold=0.5)
    rows = _rows(str(tmp_path / "run"))
    samples = _samples()
    got = np.array([rows[s.uid]["nsfw_score"] for s in samples])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    unsafe = {s.uid for s, p in zip(samples, proj) if p >= t0}
    assert 0 < len(unsafe) < len(samples)
    assert {u for u, r in rows.items() if r["drop_reason"] == "safety:nsfw"} == unsafe
    assert all(rows[u]["drop_reason"] is None for u in set(rows) - unsafe)
    assert res.dropped == {"safety:nsfw": len(unsafe)} and res.extra["nsfw_flagged"] == 0
    res.check_accounting()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flag_keeps_them_with_scores_equal_to_a_direct_computation(ray_session, tiny_clip, tmp_path):  # noqa: F811
    torch.manual_seed(7)
    head = NsfwHead(DIM)
    for name in LAYERS:  # a random head whose outputs spread over (0, 1)
        torch.nn.init.normal_(getattr(head, name).weight, std=1.0)
    head_path = tmp_path / "random-head.pt"
    torch.save(head.state_dict(), head_path)
    direct = MlpNsfw(str(head_path), DIM)(_embeddings(tiny_clip))
    threshold = float(np.median(direct))
    res = _run(str(tmp_path / "run"), tiny_clip, nsfw="mlp", nsfw_head=str(head_path), nsfw_threshold=threshold,
               nsfw_action="flag")  # fmt: skip
    rows = _rows(str(tmp_path / "run"))
    got = np.array([rows[s.uid]["nsfw_score"] for s in _samples()])
    np.testing.assert_allclose(got, direct, atol=1e-5)
    assert all(r["drop_reason"] is None for r in rows.values())
    assert res.rows_out == len(CAPTIONS) and res.extra["nsfw_flagged"] == int((direct >= threshold).sum()) > 0
    # the score travels on to the final shards' metadata and each sample's .json
    from wit_builder.stages import shards

    run_dir = str(tmp_path / "run")
    work, total = str(tmp_path / "work.parquet"), 0
    for p in io.listdir(os.path.join(run_dir, "filtered"), ".parquet"):
        name = os.path.basename(p)[: -len(".parquet")]
        dl = os.path.join(run_dir, "download", name)
        shards.collect_shard((p, dl + ".parquet", dl + ".tar", work))
        for r in io.read_parquet(work).to_pylist():
            assert r["nsfw_score"] == pytest.approx(rows[r["uid"]]["nsfw_score"])
            assert json.loads(shards.sample_json(r))["nsfw_score"] == pytest.approx(r["nsfw_score"])
            total += 1
    assert total == len(CAPTIONS)


def test_nsfw_config_errors(tmp_path):
    where = "t [filter]"
    with pytest.raises(ConfigError, match="nsfw needs clip_model"):
        from_dict(filter_stage.Config, {"nsfw": "zero_shot"}, where)
    with pytest.raises(ConfigError, match="nsfw_head"):
        from_dict(filter_stage.Config, {"nsfw": "mlp", "clip_model": "m", "clip_checkpoint": "c"}, where)
    with pytest.raises(ConfigError, match="nsfw_prompts"):
        from_dict(filter_stage.Config, {"nsfw_prompts": {"unsafe": ["a"]}}, where)
    with pytest.raises(ConfigError, match="'nsfw'"):
        from_dict(filter_stage.Config, {"nsfw": "maybe"}, where)


def test_a_head_of_the_wrong_size_is_a_config_error_before_any_work(tiny_clip, tmp_path):  # noqa: F811
    name, ckpt, cfg_path = tiny_clip
    write_run(str(tmp_path), _samples()[:1], queries=["q"])
    head_path = tmp_path / "l14-head.pt"
    torch.save(NsfwHead(768).state_dict(), head_path)
    cfg = filter_stage.Config(
        clip_model=name, clip_checkpoint=ckpt, clip_model_config=cfg_path, nsfw="mlp", nsfw_head=str(head_path)
    )
    with pytest.raises(ConfigError, match="key 'nsfw_head'.*768-d.*32-d"):
        filter_stage.run(StageContext(run_dir=str(tmp_path), progress=False), cfg)
    assert not os.path.exists(tmp_path / "filtered" / "_features")


def test_missing_head_file_exits_2_naming_the_key(tmp_path):
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"")
    sets = [
        'filter.clip_model="ViT-B-32"',
        f'filter.clip_checkpoint="{ckpt}"',
        'filter.nsfw="mlp"',
        'filter.nsfw_head="/no/such/nsfw-head.pt"',
    ]
    out = _wit("run", DEMO, "--out", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 2, out.stderr
    assert "'nsfw_head'" in out.stderr and "/no/such/nsfw-head.pt" in out.stderr
    assert "Traceback" not in out.stderr
