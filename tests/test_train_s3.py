"""`wit-train` on an object store (moto's S3 server on 127.0.0.1, the `s3_endpoint` fixture):
shards and manifest read from s3://, checkpoints, latest.json, train_log.jsonl and eval.jsonl
written to a local --out or to s3:// as asked, resume from an S3 checkpoint, `--pretrained
s3://...` (and the eval command's); every run ends with the weights (tensor by tensor), losses
and evals of the same training from the same shards on local disk."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from synthetic_shards import write_shards
from wit_builder.train import model as tmodel
from wit_builder.train.config import load_config
from wit_builder.train.loop import latest_checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "pipelines", "train-tiny.toml")
BUCKET = "wit-train"
TIMING = ("samples_per_s", "samples_per_s_per_device", "data_wait")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _s3():
    """An s3fs instance with its own listing cache (what another process sees)."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _upload_shards(local_manifest: str, prefix: str) -> str:
    """Copy a local shards folder (manifest + tars) to s3://BUCKET/prefix; returns the manifest URL.
    Manifest paths are relative to the manifest (load_manifest joins them to its folder); an
    absolute local path would still name the local tar, so it is rewritten to the tar's name."""
    fs = _s3()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    folder = os.path.dirname(local_manifest)
    manifest = json.load(open(local_manifest))
    for entry in manifest["tars"]:
        local = entry["path"] if os.path.isabs(entry["path"]) else os.path.join(folder, entry["path"])
        entry["path"] = os.path.basename(local)
        fs.put_file(local, f"{BUCKET}/{prefix}/{entry['path']}")
    fs.pipe(f"{BUCKET}/{prefix}/manifest.json", json.dumps(manifest).encode())
    return f"s3://{BUCKET}/{prefix}/manifest.json"


def _read(path: str) -> bytes:
    if "://" in path:
        return _s3().cat_file(path.removeprefix("s3://"))
    with open(path, "rb") as f:
        return f.read()


def _weights(out: str) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt, f"no checkpoint under {out}"
    return torch.load(io.BytesIO(_read(f"{ckpt}/{tmodel.WEIGHTS_FILE}")), map_location="cpu", weights_only=True)


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _records(out: str, name: str) -> list[dict]:
    lines = _read(f"{out}/{name}").decode().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_run(ref: str, other: str) -> None:
    _assert_same_weights(ref, other)
    assert _records(other, "train_log.jsonl") == _records(ref, "train_log.jsonl")
    assert _records(other, "eval.jsonl") == _records(ref, "eval.jsonl")


def _keys(prefix: str) -> list[str]:
    return sorted(p.removeprefix(f"{BUCKET}/{prefix}/") for p in _s3().find(f"{BUCKET}/{prefix}"))


# holdout: the run ends with a retrieval eval over held-out pairs read from the shards (eval.jsonl)
SETS = ["log_every=1", "batch_size=8", "data.holdout_fraction=0.1", "data.chunk=3"]


@pytest.mark.timeout(120)
def test_one_process_s3_out_checkpoints_logs_resume_and_pretrained(s3_endpoint, tmp_path):
    """Shards on S3 and --out on S3: checkpoints (pruned), latest.json, train_log/eval jsonl as
    objects; a run killed while uploading its step-8 checkpoint resumes from step 6 on S3 and ends
    identical to the uninterrupted local run; --pretrained s3://CHECKPOINT loads those weights."""
    local = write_shards(str(tmp_path / "shards"), samples=72, tars=2, image_size=32)
    remote = _upload_shards(local, "t1/shards")
    cfg = load_config(TINY, [*SETS, "steps=8", "save_every=2", "keep_checkpoints=2", "data.workers=1"])
    ref = str(tmp_path / "ref")
    out = f"s3://{BUCKET}/t1/out"
    ref_summary = train(cfg, local, ref)
    summary = train(cfg, remote, out)
    assert summary["checkpoint"] == f"{out}/checkpoints/step_00000008" == latest_checkpoint(out)
    assert summary["loss"] == ref_summary["loss"] and summary["eval"] == ref_summary["eval"]
    _assert_same_run(ref, out)
    assert [r["step"] for r in _records(out, "train_log.jsonl")] == list(range(1, 9))
    files = sorted(os.listdir(os.path.join(ref, "checkpoints", "step_00000008")))
    assert _keys("t1/out") == sorted(
        ["eval.jsonl", "train_log.jsonl", "checkpoints/latest.json"]
        + [f"checkpoints/step_0000000{s}/{f}" for s in (6, 8) for f in files]
    )  # steps 2 and 4 pruned (keep_checkpoints=2), no temporary object left

    # as if killed while uploading step 8: step 6 is the latest, step 8 partial, the log runs on
    # to a torn step-8 line, a temporary latest.json is left, eval.jsonl is of a later step
    fs, ckpts = _s3(), f"{BUCKET}/t1/out/checkpoints"
    fs.rm(f"{ckpts}/step_00000008", recursive=True)
    fs.pipe(f"{ckpts}/step_00000008/train_state.pt", b"partial")
    fs.pipe(f"{ckpts}/latest.json", json.dumps({"path": "step_00000006", "step": 6}).encode())
    fs.pipe(f"{ckpts}/.latest.json.0123abcd.tmp", b"{")
    lines = _read(f"{out}/train_log.jsonl").decode().splitlines(keepends=True)[:7]
    fs.pipe(f"{BUCKET}/t1/out/train_log.jsonl", ("".join(lines) + '{"step": 8, "epo').encode())
    again = train(cfg, remote, out)
    assert again["steps"] == 8 and again["first_loss"] == ref_summary["first_loss"]
    assert again["loss"] == ref_summary["loss"]
    _assert_same_run(ref, out)
    assert [r["step"] for r in _records(out, "train_log.jsonl")] == list(range(1, 9))
    assert _keys("t1/out") == sorted(
        ["eval.jsonl", "train_log.jsonl", "checkpoints/latest.json"]
        + [f"checkpoints/step_0000000{s}/{f}" for s in (6, 8) for f in files]
    )

    # --pretrained s3://: a checkpoint folder or its weights file, downloaded; a missing one: ConfigError
    from wit_builder.config import ConfigError

    for pretrained in (f"{out}/checkpoints/step_00000008", f"{out}/checkpoints/step_00000008/{tmodel.WEIGHTS_FILE}"):
        built = tmodel.build(cfg.model, "cpu", pretrained)
        state = built.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in _weights(ref).items())
    with pytest.raises(ConfigError, match="not found"):
        tmodel.build(cfg.model, "cpu", f"{out}/checkpoints/step_00000099")
    # python -m wit_builder.train.eval --pretrained s3://OUT: the latest checkpoint's weights
    from wit_builder.train.eval import load_model

    model, _, _ = load_model(out)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _weights(ref).items())


def _wit_train(shards: str, out: str, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "wit_builder.train", "--config", TINY, "--data", shards, "--out", out]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run_all(cmds: list[list[str]], timeout: float) -> None:
    """Run the commands side by side; each must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for c in cmds
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
    finally:  # a failure must not leave a run behind
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


@pytest.mark.timeout(240)
def test_two_ranks_torchrun_from_s3_shards_to_local_and_s3_out_equal_local(s3_endpoint, tmp_path):
    """torchrun, 2 ranks x 1 DataLoader worker, gloo: shards on S3 with --out local and with --out
    s3://, each ending with the weights, train_log and eval.jsonl of the same run on local shards."""
    local = write_shards(str(tmp_path / "shards"), samples=72, tars=2, image_size=32)
    remote = _upload_shards(local, "t2/shards")
    sets = [*SETS, "steps=6", "save_every=3", "data.workers=1"]
    ref, local_out, s3_out = str(tmp_path / "ref"), str(tmp_path / "from_s3"), f"s3://{BUCKET}/t2/out"
    _run_all(
        [_wit_train(local, ref, *sets), _wit_train(remote, local_out, *sets), _wit_train(remote, s3_out, *sets)],
        timeout=200,
    )
    assert latest_checkpoint(s3_out) == f"{s3_out}/checkpoints/step_00000006"
    for out in (local_out, s3_out):
        _assert_same_run(ref, out)
    assert [r["step"] for r in _records(s3_out, "train_log.jsonl")] == list(range(1, 7))
