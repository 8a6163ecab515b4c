"""`wit-build demo`: the whole system on the bundled demo data, on this machine.

1. serve the 76 bundled CC BY / BY-SA photos (demo/images) from a local HTTP server on 127.0.0.1,
   with a few URLs that fail on purpose (404, HTML served as .jpg) and a few bad rows (ftp://
   URL, empty caption, an exact duplicate, a row on a blocklisted host) so the status
   accounting shows;
2. write the url list (url, caption) for that server and run pipelines/demo.toml end to end
   with embedded Ray: queries -> candidates -> match -> balance -> download -> filter -> shards;
3. train a tiny randomly initialised CLIP for a few CPU steps on the shards and evaluate it
   zero-shot on a small labelled folder built from the demo photos;
4. write the report (`wit-build stats`) and print a summary a person can read, with the
   report's path and the `wit-build serve` command that browses the run.

Example:
    $ wit-build demo --out runs/demo
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from typing import Any

from wit_builder import io
from wit_builder.demo_server import RunningServer, serve_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, "demo")
BLOCKED_HOST = "blocked.demo.invalid"  # listed in demo/blocklist.txt: dropped before any fetch
PREFERRED_PORT = 8642  # a fixed port keeps the URLs (and so every uid) the same across demo runs


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed demo server is fine
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def prepare_site(www: str) -> None:
    """Copy the demo photos into `www/images` and add a non-image served as .jpg."""
    images = os.path.join(www, "images")
    os.makedirs(images, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(DEMO_DIR, "images"))):
        dst = os.path.join(images, name)
        if not os.path.exists(dst):
            shutil.copyfile(os.path.join(DEMO_DIR, "images", name), dst)
    with open(os.path.join(images, "not-an-image.jpg"), "w") as f:
        f.write("<html><body>This page is HTML, not a JPEG.</body></html>\n")


def url_rows(base_url: str) -> list[dict[str, Any]]:
    """The demo's candidate url list: every real caption of every photo, plus rows that fail."""
    import pyarrow.parquet as pq

    captions = pq.read_table(os.path.join(DEMO_DIR, "captions.parquet")).to_pylist()
    rows = [{"url": f"{base_url}/images/{c['file']}", "caption": c["caption"]} for c in captions]
    rows += [
        {"url": f"{base_url}/images/missing-dog.jpg", "caption": "A dog asleep on a red couch."},  # 404
        {"url": f"{base_url}/images/missing-train.jpg", "caption": "A train at a station platform."},  # 404
        {"url": f"{base_url}/images/not-an-image.jpg", "caption": "A cat on a kitchen table."},  # HTML
        {"url": "ftp://example.invalid/cat.jpg", "caption": "A cat sitting on a car."},  # bad scheme
        {"url": f"http://{BLOCKED_HOST}/images/{captions[1]['file']}", "caption": "A dog on a beach."},  # blocklist
        {"url": f"{base_url}/images/{captions[0]['file']}", "caption": ""},  # empty caption
        dict(rows[0]),  # exact duplicate of the first row
    ]
    return rows


def write_url_list(path: str, rows: list[dict[str, Any]]) -> None:
    """Write the url list, leaving the file untouched when its content is unchanged (keeps the
    pipeline's input fingerprint, so a rerun of the demo redoes nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string())]))
    if os.path.exists(path) and pq.read_table(path).equals(table):
        return
    io.write_parquet(table, path)


def start_server(www: str) -> RunningServer:
    port = PREFERRED_PORT if _free(PREFERRED_PORT) else 0
    return serve_directory(www, port=port)


def run_demo(out: str, pipeline_path: str | None = None, train: bool = True, overrides: list[str] | None = None) -> int:
    """Run the demo into `out`; returns the exit code."""
    from wit_builder.pipeline import load_pipeline
    from wit_builder.runner import run_pipeline

    out = os.path.abspath(out)
    pipeline_path = pipeline_path or os.path.join(REPO, "pipelines", "demo.toml")
    www = os.path.join(out, "www")
    prepare_site(www)
    server = start_server(www)
    print(f"demo: serving {len(os.listdir(os.path.join(www, 'images')))} files at {server.base_url}", file=sys.stderr)
    try:
        urls = os.path.join(out, "inputs", "urls.parquet")
        rows = url_rows(server.base_url)
        write_url_list(urls, rows)
        sets = [f'candidates.inputs=["{urls}"]'] + list(overrides or [])
        pipeline = load_pipeline(pipeline_path, sets)
        results = run_pipeline(pipeline, out, overrides=sets)
    finally:
        server.stop()
    training = _train(pipeline, out) if train else None
    print_summary(out, results, training)
    return 0


def _train(pipeline: Any, out: str) -> dict[str, Any] | None:
    """Train and evaluate once per set of shards: a rerun over the same shards (same manifest
    bytes and [train] table) shows the saved result; new shards start training afresh."""
    import hashlib
    import json

    from wit_builder.train.demo_run import train_and_zero_shot

    manifest = os.path.join(out, "shards", "manifest.json")
    train_dir = os.path.join(out, "train")
    saved = os.path.join(train_dir, "demo_summary.json")
    with open(manifest, "rb") as f:
        key = hashlib.sha256(f.read() + json.dumps(pipeline.train, sort_keys=True).encode()).hexdigest()
    if os.path.exists(saved):
        done = io.read_json(saved)
        if done.get("key") == key:
            print("demo: training on these shards already done, showing its result", file=sys.stderr)
            return done["summary"]
    shutil.rmtree(train_dir, ignore_errors=True)
    print("demo: training a tiny CLIP on the shards (CPU) and evaluating it zero-shot", file=sys.stderr)
    summary = train_and_zero_shot(
        manifest,
        train_dir,
        os.path.join(DEMO_DIR, "images"),
        os.path.join(DEMO_DIR, "captions.parquet"),
        table=pipeline.train or None,
    )
    io.write_json({"key": key, "summary": summary}, saved)
    return summary


def safety_lines(results: dict[str, Any]) -> list[str]:
    """The summary's "removed for safety" account: rows per safety list (any stage) and the
    faces blurred in stored images.

    >>> from wit_builder.stages.base import StageResult
    >>> r = {"candidates": StageResult(3, 2, {"safety:blocklist:hosts": 1})}
    >>> r["download"] = StageResult(2, 2, extra={"faces_blurred": 4})
    >>> print("\\n".join(safety_lines(r)))
    safety:
      candidates  safety:blocklist:hosts: 1 row(s) removed
      download    faces blurred in stored images: 4
    """
    lines = ["safety:"]
    for name, r in results.items():
        for reason, n in sorted(r.dropped.items()):
            if reason.startswith("safety:"):
                lines.append(f"  {name:<11} {reason}: {n} row(s) removed")
    download = results.get("download")
    if download is not None and "faces_blurred" in download.extra:
        lines.append(f"  {'download':<11} faces blurred in stored images: {download.extra['faces_blurred']}")
    return lines if len(lines) > 1 else []


def print_summary(out: str, results: dict[str, Any], training: dict[str, Any] | None) -> None:
    import shlex

    from wit_builder.catalog import format_table, query
    from wit_builder.report import write_report

    lines = ["", "=" * 72, f"wit-builder demo: {out}", "=" * 72, "rows per stage (in -> out, dropped by reason):"]
    for name, r in results.items():
        drops = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()) if v) or "none"
        check = "ok" if r.rows_out + sum(r.dropped.values()) == r.rows_in else "MISMATCH"
        lines.append(f"  {name:<11} {r.rows_in:>6} -> {r.rows_out:<6} dropped: {drops}  [accounting {check}]")
    manifest = io.read_json(os.path.join(out, "shards", "manifest.json"))
    lines.append(
        f"shards: {len(manifest['tars'])} tar(s), {manifest['total_samples']} samples, "
        f"{manifest['total_bytes']:,} bytes -> {os.path.join(out, 'shards', 'manifest.json')}"
    )
    lines += safety_lines(results)
    sql = "SELECT query_text, count(*) AS n FROM shards GROUP BY 1 ORDER BY n DESC, 1 LIMIT 8"
    cols, rows = query(out, sql)
    lines += ["", f'$ wit-build sql {out} "{sql}"', format_table(cols, rows)]
    if training:
        lines += ["", "training (tiny CLIP, random init, CPU):"]
        lines += [f"  {k}: {round(v, 4) if isinstance(v, float) else v}" for k, v in training.items()]
        lines.append(
            f"  ({training['steps']} steps of a random-init model: this shows the path works, not model quality)"
        )
    lines += ["", f"report: {write_report(out)}", f"browse the run: wit-build serve {shlex.quote(out)}"]
    lines.append("=" * 72)
    print("\n".join(lines))
