"""The training loop end to end on CPU: loss falls, resume mid-epoch is exact, Ctrl-C checkpoints,
checkpoints load in open_clip with identical embeddings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from synthetic_shards import write_captioned_photo_shards, write_shards
from wit_builder.train import data as tdata
from wit_builder.train.config import load_config
from wit_builder.train.loop import latest_checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "pipelines", "train-tiny.toml")
DEMO = os.path.join(REPO, "demo")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _cfg(*sets: str):
    return load_config(TINY, ["log_every=1", "save_every=0", *sets])


def _keys_by_epoch(*logs: str, max_step: dict[str, int] | None = None) -> dict[int, Counter]:
    """epoch -> Counter of trained keys from key logs (`epoch\\tstep\\tkey` lines)."""
    out: dict[int, Counter] = {}
    for path in logs:
        if not os.path.exists(path):
            continue
        for line in open(path):
            epoch, step, key = line.rstrip("\n").split("\t")
            if max_step and path in max_step and int(step) > max_step[path]:
                continue
            out.setdefault(int(epoch), Counter())[key] += 1
    return out


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """The bundled demo photos (76 COCO photos x 5 captions) at 40 px as shards; synthetic shapes
    when the demo photos are absent."""
    folder = str(tmp_path_factory.mktemp("demo_shards"))
    captions = os.path.join(DEMO, "captions.parquet")
    if not os.path.exists(captions):
        return write_shards(folder, samples=380, tars=2, image_size=40)
    return write_captioned_photo_shards(os.path.join(DEMO, "images"), captions, folder, size=40)


@pytest.mark.timeout(120)
def test_loss_falls_on_demo_shards(demo_shards, tmp_path):
    cfg = _cfg("steps=240", "data.workers=0", "optim.lr=2e-3", "optim.warmup_steps=20")
    summary = train(cfg, demo_shards, str(tmp_path))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "train_log.jsonl")]
    assert len(losses) == 240
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    record = json.loads(open(tmp_path / "train_log.jsonl").readlines()[-1])
    assert {"loss", "logit_scale", "lr", "samples_per_s", "samples_per_s_per_device", "data_wait"} <= set(record)
    assert summary["checkpoint"] == latest_checkpoint(str(tmp_path))


@pytest.mark.timeout(180)
def test_stopped_mid_epoch_and_resumed_sees_each_key_once(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), samples=90, tars=2, image_size=32)
    all_keys = Counter(k for k, _ in tdata.iter_samples(tdata.load_manifest(shards), None))
    common = ("steps=0", "epochs=2", "batch_size=8", "data.workers=2", "data.chunk=3")
    # uninterrupted: two epochs
    ref_log = str(tmp_path / "ref.keys")
    ref = train(_cfg(*common), shards, str(tmp_path / "ref"), keys_log=ref_log)
    # interrupted after 5 steps of epoch 0 (a checkpoint with the data position), then resumed
    part_log = str(tmp_path / "part.keys")
    first = train(_cfg(*common, "steps=5"), shards, str(tmp_path / "run"), keys_log=part_log)
    assert first["steps"] == 5 and first["epoch"] == 0
    second = train(_cfg(*common), shards, str(tmp_path / "run"), keys_log=part_log)
    assert second["steps"] == ref["steps"] and second["epoch"] == 2
    want = {0: all_keys, 1: all_keys}
    assert _keys_by_epoch(ref_log) == want
    assert _keys_by_epoch(part_log) == want


def test_drop_mode_drops_only_the_partial_last_batch(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), samples=45, tars=2, image_size=32)
    log = str(tmp_path / "keys")
    got = train(
        _cfg("steps=0", "epochs=1", "batch_size=8", "data.workers=0", 'data.last_batch="drop"'),
        shards,
        str(tmp_path / "out"),
        keys_log=log,
    )
    keys = _keys_by_epoch(log)[0]
    assert got["steps"] == 5 and got["samples_seen"] == 40 and len(keys) == 40 and set(keys.values()) == {1}


@pytest.mark.timeout(240)
def test_ctrl_c_under_torchrun_checkpoints_and_resume_completes_the_epoch(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), samples=400, tars=1, image_size=32)
    all_keys = Counter(k for k, _ in tdata.iter_samples(tdata.load_manifest(shards), None))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "wit_builder.train",
        "--config",
        TINY,
        "--data",
        shards,
        "--out",
        str(out),
        "--keys-log",
        str(tmp_path / "keys"),
        "--set",
        "steps=0",
        "--set",
        "epochs=1",
        "--set",
        "batch_size=4",
        "--set",
        "log_every=1",
        "--set",
        "data.workers=1",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    log = out / "train_log.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    ckpt = latest_checkpoint(str(out))
    assert ckpt is not None, err[-3000:]
    stopped_at = json.load(open(out / "checkpoints" / "latest.json"))["step"]
    assert 3 <= stopped_at < 100, err[-3000:]  # 400 samples / 4 per step: mid-epoch
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)["state"]
    assert state["epoch"] == 0 and sum(map(sum, state["positions"])) == state["samples_seen"]
    # resume (no signal) to the end of the epoch
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [str(tmp_path / f"keys.{r}") for r in range(2)]
    assert _keys_by_epoch(*logs) == {0: all_keys}


def test_checkpoint_loads_in_open_clip_with_identical_embeddings(tmp_path):
    import open_clip

    from wit_builder.train import model as tmodel
    from wit_builder.train.config import ModelConfig

    torch.manual_seed(5)
    built = tmodel.build(ModelConfig(name="wit-ckpt-tiny", arch=tmodel.TINY_ARCH))
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in built.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = str(tmp_path / "ckpt")
    tmodel.save_for_open_clip(built.model, built.model_cfg, "wit-ckpt-tiny", folder)
    images = torch.randn(3, 3, 32, 32)
    texts = open_clip.get_tokenizer("wit-ckpt-tiny")(["a dog", "a red square", "two cats"])
    built.model.eval()
    with torch.no_grad():
        want = built.model.encode_image(images), built.model.encode_text(texts)
    # 1) open_clip's own local-dir loader
    m1, _, _ = open_clip.create_model_and_transforms("local-dir:" + folder)
    # 2) the architecture name + pretrained=path (registering the saved config as a user would)
    open_clip.add_model_config(os.path.join(folder, "wit-ckpt-tiny.json"))
    m2, _, _ = open_clip.create_model_and_transforms(
        "wit-ckpt-tiny", pretrained=os.path.join(folder, tmodel.WEIGHTS_FILE)
    )
    for m in (m1, m2):
        m.eval()
        with torch.no_grad():
            assert torch.equal(m.encode_image(images), want[0])
            assert torch.equal(m.encode_text(texts), want[1])


def _readme_python(section: str) -> str:
    """The ```python block of README.md's section whose heading starts with `section`."""
    text = open(os.path.join(REPO, "README.md")).read()
    body = text[text.index(section) :]
    body = body[: body.find("\n## ", 1)]
    start = body.index("```python\n") + len("```python\n")
    return body[start : body.index("```", start)]


@pytest.mark.timeout(240)
def test_readme_open_clip_loading_code_works_as_written(tmp_path):
    """The README's open_clip snippet, verbatim, in a fresh interpreter (nothing registered with
    open_clip beforehand) on a checkpoint wit-train wrote of the tiny model (name wit-tiny), at the
    path the snippet names: every model and tokenizer it makes embeds like the trained model."""
    from wit_builder.train import model as tmodel

    shards = write_shards(str(tmp_path / "shards"), samples=16, tars=1, image_size=32)
    cfg = _cfg("steps=2", "batch_size=8", "data.workers=0")
    train(cfg, shards, str(tmp_path / "run"))
    code = _readme_python("## Training CLIP on the shards")
    where = re.search(r'ckpt = "([^"]+)"', code).group(1)
    shutil.copytree(latest_checkpoint(str(tmp_path / "run")), tmp_path / where)
    built = tmodel.build(cfg.model)
    built.model.load_state_dict(torch.load(tmp_path / where / tmodel.WEIGHTS_FILE, weights_only=True))
    built.model.eval()
    images = torch.randn(3, 3, 32, 32)
    captions = ["a dog", "a red square", "two cats"]
    with torch.no_grad():
        want = built.model.encode_image(images), built.model.encode_text(built.tokenizer(captions))
    torch.save({"images": images, "captions": captions, "want": want}, tmp_path / "want.pt")
    check = (
        "import open_clip, torch\n"
        "made = {'models': [], 'tokenizers': []}\n"
        "_cm, _gt = open_clip.create_model_and_transforms, open_clip.get_tokenizer\n"
        "def _record_model(*a, **k):\n"
        "    r = _cm(*a, **k); made['models'].append(r[0]); return r\n"
        "def _record_tokenizer(*a, **k):\n"
        "    r = _gt(*a, **k); made['tokenizers'].append(r); return r\n"
        "open_clip.create_model_and_transforms, open_clip.get_tokenizer = _record_model, _record_tokenizer\n"
        f"exec(compile({code!r}, 'README.md', 'exec'))\n"
        "w = torch.load('want.pt')\n"
        "assert len(made['models']) == 2 and len(made['tokenizers']) == 2, made\n"
        "for m, tok in zip(made['models'], made['tokenizers']):\n"
        "    m.eval()\n"
        "    with torch.no_grad():\n"
        "        assert torch.equal(m.encode_image(w['images']), w['want'][0])\n"
        "        assert torch.equal(m.encode_text(tok(w['captions'])), w['want'][1])\n"
        "print('ok', len(made['models']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and "ok 2" in done.stdout, done.stderr[-3000:]
