"""A stopped run (SIGTERM: a preempted job) saves a checkpoint and exits 0 on every rank, also
under torchrun with DataLoader workers; the same command resumes it and ends with bit-identical
weights, the same per-step losses, each step logged once, and the run's first loss in its summary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from synthetic_shards import write_shards
from wit_builder.train import loop
from wit_builder.train import model as tmodel
from wit_builder.train.config import load_config
from wit_builder.train.loop import latest_checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "pipelines", "train-tiny.toml")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _weights(out) -> dict[str, torch.Tensor]:
    path = os.path.join(latest_checkpoint(str(out)), tmodel.WEIGHTS_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _log(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def _stop_at(monkeypatch, step: int) -> None:
    """Make the loop see a SIGTERM once it has trained `step` steps (deterministic, no real signal)."""
    done = [0]
    optimizer_step = loop._optimizer_step

    def counting(*args):
        done[0] += 1
        return optimizer_step(*args)

    class StopAfter(loop.StopRequest):
        @property
        def signal(self):
            return "SIGTERM" if done[0] >= step else None

        @signal.setter
        def signal(self, value):
            pass

    monkeypatch.setattr(loop, "_optimizer_step", counting)
    monkeypatch.setattr(loop, "StopRequest", StopAfter)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop_after", [5, 15])  # mid-epoch 0 (rows left over in a chunk), mid-epoch 1
def test_stopped_and_resumed_run_ends_with_identical_weights(tmp_path, monkeypatch, stop_after):
    """Two DataLoader workers with chunks that do not fit the batch: the resumed run must rebuild
    the very same batches (chunk cuts, the workers' round-robin, per-sample augmentation)."""
    shards = write_shards(str(tmp_path / "shards"), samples=90, tars=2, image_size=32)
    sets = ["log_every=1", "save_every=0", "steps=0", "epochs=2", "batch_size=8", "data.workers=2", "data.chunk=3"]
    cfg = load_config(TINY, sets)
    ref = train(cfg, shards, str(tmp_path / "ref"))
    with monkeypatch.context() as m:
        _stop_at(m, stop_after)
        first = train(cfg, shards, str(tmp_path / "run"))
    assert first["stopped"] and first["signal"] == "SIGTERM" and first["steps"] == stop_after
    second = train(cfg, shards, str(tmp_path / "run"))
    assert not second["stopped"] and second["steps"] == ref["steps"] == 24
    _assert_same_weights(tmp_path / "ref", tmp_path / "run")
    assert _untimed_log(tmp_path / "run") == _untimed_log(tmp_path / "ref")  # each step once, same losses
    assert second["first_loss"] == ref["first_loss"] == first["first_loss"]
    assert second["loss"] == ref["loss"]


def _untimed_log(out) -> list[dict]:
    timing = ("samples_per_s", "samples_per_s_per_device", "data_wait")
    return [{k: v for k, v in r.items() if k not in timing} for r in _log(out)]


@pytest.mark.timeout(180)
def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path):
    """A run killed outright (no checkpoint at the end) resumes from its last save: the log lines
    of the steps trained again are replaced, not repeated (a torn last line goes too)."""
    shards = write_shards(str(tmp_path / "shards"), samples=64, tars=1, image_size=32)
    cfg = load_config(
        TINY, ["log_every=1", "save_every=4", "keep_checkpoints=5", "steps=10", "batch_size=8", "data.workers=0"]
    )
    out = tmp_path / "run"
    ref = train(cfg, shards, str(out))
    ref_log = _untimed_log(out)
    # as if killed after step 7: checkpoint of step 4 is the latest, the log runs on to step 7
    ckpts = out / "checkpoints"
    for d in os.listdir(ckpts):
        if d.startswith("step_") and d != "step_00000004":
            shutil.rmtree(ckpts / d)
    (ckpts / "latest.json").write_text(json.dumps({"path": "step_00000004", "step": 4}))
    lines = open(out / "train_log.jsonl").read().splitlines(keepends=True)[:7]
    (out / "train_log.jsonl").write_text("".join(lines) + '{"step": 8, "epo')
    again = train(cfg, shards, str(out))
    assert [r["step"] for r in _log(out)] == list(range(1, 11))
    assert _untimed_log(out) == ref_log
    assert again["first_loss"] == ref["first_loss"] and again["loss"] == ref["loss"]


def _wit_train(shards: str, out, *sets: str, torchrun: bool = True) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "wit_builder.train", "--config", TINY, "--data", shards, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _sigterm_after_steps(proc: subprocess.Popen, out, steps: int, deadline_s: float) -> float:
    """Wait until train_log.jsonl has `steps` lines, SIGTERM the process (not its group); returns
    the time it was sent."""
    log = os.path.join(out, "train_log.jsonl")
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).read().splitlines()) >= steps:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it was signalled"
    sent = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    return sent


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s: {err[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_torchrun_checkpoints_exits_0_and_resume_matches_uninterrupted(tmp_path):
    """torchrun forwards SIGTERM to each rank's process group, DataLoader workers included: the
    workers ignore it, the ranks finish the step, agree, save and exit 0 well inside torchrun's
    30 s grace period (after which it would SIGKILL them). torchrun itself then exits 1: it
    re-raises the signal as SignalException whatever its workers did, so each rank reports its
    own exit code on stderr."""
    shards = write_shards(str(tmp_path / "shards"), samples=400, tars=2, image_size=32)
    sets = ("steps=60", "batch_size=4", "log_every=1", "save_every=0", "data.workers=2", "data.chunk=3")
    ref = _start(_wit_train(shards, tmp_path / "ref", *sets))  # the uninterrupted run, alongside
    procs = [ref]
    try:
        run_cmd = _wit_train(shards, tmp_path / "run", *sets)
        proc = _start(run_cmd)
        procs.append(proc)
        sent = _sigterm_after_steps(proc, tmp_path / "run", 3, deadline_s=300)
        out, err = _finish(proc, timeout=60)
        took = time.time() - sent
        assert took < 30, f"{took:.1f} s from SIGTERM to exit"
        assert "forcefully" not in err and "is killed by signal" not in err, err[-3000:]
        stopped_at = json.load(open(tmp_path / "run" / "checkpoints" / "latest.json"))["step"]
        assert 3 <= stopped_at < 60, err[-3000:]
        for rank in (0, 1):  # torchrun's own exit code is 1 (see above): each rank's, as it reports it
            line = f"[rank {rank}] stopped by SIGTERM at step {stopped_at}, checkpoint saved; exit code 0"
            assert line in err, err[-3000:]
        assert json.loads(out.splitlines()[-1])["steps"] == stopped_at
        print(f"SIGTERM to torchrun exit: {took:.2f} s, stopped at step {stopped_at}")
        # the same command resumes and completes
        done = subprocess.run(
            run_cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        ref_out, ref_err = _finish(ref, timeout=300)
        assert ref.returncode == 0, ref_err[-3000:]
        _assert_same_weights(tmp_path / "ref", tmp_path / "run")
        assert _untimed_log(tmp_path / "run") == _untimed_log(tmp_path / "ref")
        summary, ref_summary = json.loads(done.stdout.splitlines()[-1]), json.loads(ref_out.splitlines()[-1])
        assert summary["first_loss"] == ref_summary["first_loss"] and summary["loss"] == ref_summary["loss"]
    finally:  # a failed assertion must not leave a run behind
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


@pytest.mark.timeout(300)
def test_sigterm_to_wit_train_exits_0_after_saving(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), samples=200, tars=1, image_size=32)
    proc = _start(_wit_train(shards, tmp_path / "run", "steps=400", "batch_size=4", "log_every=1", torchrun=False))
    try:
        sent = _sigterm_after_steps(proc, tmp_path / "run", 2, deadline_s=200)
    except AssertionError:
        proc.communicate()
        raise
    out, err = _finish(proc, timeout=60)
    took = time.time() - sent
    assert proc.returncode == 0 and took < 30, (proc.returncode, took, err[-3000:])
    summary = json.loads(out.splitlines()[-1])
    assert summary["stopped"] and summary["signal"] == "SIGTERM" and 2 <= summary["steps"] < 400
    assert summary["checkpoint"] == latest_checkpoint(str(tmp_path / "run"))
    print(f"SIGTERM to wit-train exit: {took:.2f} s")
