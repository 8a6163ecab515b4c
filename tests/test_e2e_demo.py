"""The whole pipeline on the bundled demo data: accounting, agreement of counts, idempotent rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from wit_builder.catalog import query
from wit_builder.demo import REPO, prepare_site, start_server, url_rows, write_url_list
from wit_builder.pipeline import load_pipeline
from wit_builder.runner import run_pipeline, stage_states

DEMO = os.path.join(REPO, "pipelines", "demo.toml")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, ray_session):
    """Run pipelines/demo.toml once against a local server; yields (run_dir, results, rerun)."""
    out = str(tmp_path_factory.mktemp("demo_run"))
    www = os.path.join(out, "www")
    prepare_site(www)
    server = start_server(www)
    try:
        urls = os.path.join(out, "inputs", "urls.parquet")
        write_url_list(urls, url_rows(server.base_url))
        sets = [f'candidates.inputs=["{urls}"]']
        pipeline = load_pipeline(DEMO, sets)
        results = run_pipeline(pipeline, out, overrides=sets)
        first_manifest = open(os.path.join(out, "shards", "manifest.json"), "rb").read()
        reran: list[str] = []
        run_pipeline(
            pipeline, out, overrides=sets, on_result=lambda n, r, skipped: reran.append(n) if not skipped else None
        )
    finally:
        server.stop()
    yield out, results, first_manifest, reran


@pytest.mark.timeout(600)
def test_every_stage_accounts_for_every_row(demo_run):
    out, results, _, _ = demo_run
    assert list(results) == ["queries", "candidates", "match", "balance", "download", "filter", "shards"]
    for name, r in results.items():
        assert r.rows_out + sum(r.dropped.values()) == r.rows_in, name
    # the demo's bad rows show up as drop reasons
    assert sum(results["candidates"].dropped.values()) >= 3
    assert results["match"].dropped.get("no_match", 0) > 0
    assert sum(results["balance"].dropped.values()) > 0, "cap 5 must visibly drop pairs"
    assert sum(results["download"].dropped.values()) >= 3, "the 404s and the HTML-as-jpg must fail"
    assert results["shards"].rows_out > 0
    # each stage's input is the previous stage's output
    order = list(results)
    for prev, nxt in zip(order[1:], order[2:]):
        assert results[nxt].rows_in == results[prev].rows_out, (prev, nxt)


@pytest.mark.timeout(120)
def test_sql_manifest_and_tars_agree(demo_run):
    out = demo_run[0]
    manifest = json.load(open(os.path.join(out, "shards", "manifest.json")))
    ((sql_count,),) = query(out, "SELECT count(*) FROM shards")[1]
    in_tars = 0
    for entry in manifest["tars"]:
        with tarfile.open(os.path.join(out, "shards", entry["path"])) as tf:
            keys = {m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")}
        assert len(keys) == entry["samples"]
        in_tars += len(keys)
    assert sql_count == manifest["total_samples"] == in_tars > 0
    ((over_cap,),) = query(
        out, "SELECT count(*) FROM (SELECT query_id, count(*) n FROM shards GROUP BY 1) WHERE n > 5"
    )[1]
    assert over_cap == 0


@pytest.mark.timeout(120)
def test_rerun_redoes_nothing_and_manifest_is_byte_identical(demo_run):
    out, _, first_manifest, reran = demo_run
    assert reran == []
    assert open(os.path.join(out, "shards", "manifest.json"), "rb").read() == first_manifest
    assert {s.state for s in stage_states(out)} == {"done"}


@pytest.mark.timeout(120)
def test_status_and_sql_commands(demo_run):
    out = demo_run[0]
    status = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "status", out], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0
    assert status.stdout.count(" done ") == 7
    sql = subprocess.run(
        [
            sys.executable,
            "-m",
            "wit_builder.cli",
            "sql",
            out,
            "SELECT status, count(*) n FROM samples GROUP BY 1 ORDER BY 1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sql.returncode == 0 and "success" in sql.stdout and "failed" in sql.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "wit_builder.cli", "sql", out, "SELECT nope FROM shards"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.timeout(120)
def test_stats_report_shows_the_run(demo_run):
    from wit_builder.report import write_report

    out, results, _, _ = demo_run
    path = write_report(out)
    page = open(path).read()
    for name, r in results.items():
        assert f"<td>{name}</td><td>done</td><td>{r.rows_in}</td><td>{r.rows_out}</td>" in page
    for png in ("funnel.png", "query_balance.png", "widths.png", "captions.png"):
        assert os.path.getsize(os.path.join(out, "report", png)) > 1000
