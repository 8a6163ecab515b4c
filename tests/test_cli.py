"""The CLI: fast --help without torch/ray, exit code 2 on config errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO = os.path.join(REPO, "pipelines", "demo.toml")


def _wit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import sys; from wit_builder import cli\n"
        "try:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        f"from wit_builder.pipeline import load_pipeline; load_pipeline({DEMO!r}, check_paths=False)\n"
        "bad = [m for m in ('torch', 'ray', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--ray-address" in out.stdout


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "queries",
        "candidates",
        "match",
        "balance",
        "download",
        "filter",
        "shards",
        "status",
        "sql",
        "stats",
        "demo",
    ],
)
def test_every_command_has_help_with_an_example(command):
    out = _wit(command, "--help")
    assert out.returncode == 0
    assert "example" in out.stdout


def _demo_text() -> str:
    """demo.toml with its relative input paths made absolute, to copy elsewhere."""
    return (
        open(DEMO).read().replace('"../demo/', '"' + os.path.join(os.path.dirname(os.path.dirname(DEMO)), "demo") + "/")
    )


def test_unknown_key_exits_2_naming_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(_demo_text().replace("[balance]", "[balance]\nkap = 3", 1))
    out = _wit("run", str(bad), "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "unknown key 'kap'" in out.stderr and "bad.toml [balance]" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists(), "no work may start before the config is valid"


def test_unknown_section_and_bad_override_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(_demo_text() + "\n[balanse]\ncap = 3\n")
    out = _wit("run", str(bad), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "unknown section [balanse]" in out.stderr
    out = _wit("run", DEMO, "--out", str(tmp_path / "r"), "--set", "balance.cap=oops")
    assert out.returncode == 2 and "balance" in out.stderr and "'cap'" in out.stderr


def test_missing_input_path_exits_2(tmp_path):
    out = _wit("run", DEMO, "--out", str(tmp_path / "r"), "--set", 'candidates.inputs=["/no/such/file.parquet"]')
    assert out.returncode == 2
    assert "'inputs'" in out.stderr and "/no/such/file.parquet" in out.stderr


def test_status_and_sql_on_missing_run_dir_exit_2(tmp_path):
    for args in (("status", str(tmp_path / "nope")), ("sql", str(tmp_path / "nope"), "SELECT 1")):
        out = _wit(*args)
        assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_bad_inputs_exit_2_without_a_traceback(tmp_path):
    cases = []
    (tmp_path / "section.toml").write_text("balance = 3\n")
    cases.append((("run", str(tmp_path / "section.toml"), "--out", str(tmp_path / "r")), "[balance] must be a table"))
    (tmp_path / "latin.toml").write_bytes(b"\xff\xfe")
    cases.append((("run", str(tmp_path / "latin.toml"), "--out", str(tmp_path / "r")), "not valid TOML"))
    (tmp_path / "file").write_text("x")
    cases.append((("run", DEMO, "--out", str(tmp_path / "file")), "is not a directory"))
    cases.append((("run", DEMO, "--out", str(tmp_path / "r"), "--set", "train.steps=abc"), "[train] key 'steps'"))
    cases.append(
        (
            ("run", DEMO, "--out", str(tmp_path / "r"), "--set", "candidates.inputs=[]"),
            "[candidates] inputs: no input files given",
        )
    )
    cases.append((("status", str(tmp_path)), "not a wit-build run directory"))
    cases.append((("sql", str(tmp_path), "select 1"), "not a wit-build run directory"))
    cases.append((("sql", str(tmp_path), "select 1", "--max-rows", "-1"), "whole number >= 0"))
    for args, message in cases:
        out = _wit(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "r").exists(), "no stage may run before the config is valid"


def test_status_into_a_closed_pipe_exits_quietly(tmp_path):
    """`wit-build status DIR | head -1`: no traceback when the reader goes away."""
    from wit_builder import io
    from wit_builder.stages.base import StageResult

    run = tmp_path / "run"
    io.write_json({"source": DEMO, "overrides": []}, str(run / "pipeline.json"))
    for d in ("queries", "candidates", "matched", "selected", "download", "filtered", "shards"):
        io.write_json({"fingerprint": "f", "result": StageResult(1, 1).to_json()}, str(run / d / "_SUCCESS.json"))
    out = subprocess.run(
        f"set -o pipefail; {sys.executable} -m wit_builder.cli status {run} | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        executable="/bin/bash",
    )
    assert out.stderr == "" and out.returncode == 141, out.stderr  # as `cat` killed by SIGPIPE
