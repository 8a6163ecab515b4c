"""`wit-build`: the command line. Thin: parse, load the config, call the library.

Importing this module (and `--help`) loads neither torch nor ray.

Example:
    $ wit-build run pipelines/demo.toml --out runs/r1
    $ wit-build status runs/r1
    $ wit-build sql runs/r1 "SELECT count(*) FROM shards"
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from wit_builder.stages import STAGE_ORDER

EPILOG = """\
examples:
  wit-build demo                                   # the whole pipeline on the bundled demo data
  wit-build run pipelines/demo.toml --out runs/r1  # all stages, resumable: rerun to continue
  wit-build run pipelines/demo.toml --out runs/r1 --set balance.cap=10   # redo balance and after
  wit-build match pipelines/demo.toml --out runs/r1                      # one stage alone
  wit-build run pipelines/cc.toml --out s3://bucket/r2 --ray-address auto   # on a Ray cluster
  wit-build status runs/r1
  wit-build stats runs/r1                          # report.html + PNG plots
  wit-build sql runs/r1 "SELECT query_text, count(*) n FROM shards GROUP BY 1 ORDER BY n DESC"
"""

STAGE_HELP = {
    "queries": "build the query list (queries/queries.parquet)",
    "candidates": "read candidate (url, caption) pairs from url lists or WARC/WAT",
    "match": "find the queries each caption contains (Aho-Corasick, Ray workers)",
    "balance": "cap each query's pairs (deterministic)",
    "download": "fetch and resize the selected images into shards (Ray tasks, resumable)",
    "filter": "drop samples by size, aspect, caption, language, duplicates, CLIP score",
    "shards": "write the final webdataset tars, metadata and manifest.json",
}


def _add_pipeline_args(p: argparse.ArgumentParser, pipeline_optional: bool = False) -> None:
    p.add_argument("pipeline", nargs="?" if pipeline_optional else None, help="pipeline TOML file (see pipelines/)")
    p.add_argument(
        "--out",
        required=not pipeline_optional,
        metavar="DIR",
        help="run directory (local path or fsspec URL such as s3://bucket/run)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="connect to an existing Ray cluster (e.g. 'auto'); default: embedded local Ray",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax), e.g. --set balance.cap=100; repeatable",
    )
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if already done")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wit-build",
        description="Build a WIT-style (CLIP) image-text dataset: queries -> candidates -> match -> "
        "balance -> download -> filter -> shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from wit_builder import __version__

    parser.add_argument("--version", action="version", version=f"wit-builder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run all stages in order (skips finished ones)",
        description="Run every stage in order into --out. Finished stages whose config "
        "and inputs did not change are skipped; a changed stage is redone with "
        "everything after it. An interrupted run resumes where it stopped.",
        epilog="example:\n  wit-build run pipelines/demo.toml --out runs/r1 --from match",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_pipeline_args(p)
    p.add_argument("--from", dest="from_stage", choices=STAGE_ORDER, help="start at this stage")

    for stage in STAGE_ORDER:
        p = sub.add_parser(
            stage,
            help=STAGE_HELP[stage],
            description=STAGE_HELP[stage] + ". The stages before it must be finished in --out.",
            epilog=f"example:\n  wit-build {stage} pipelines/demo.toml --out runs/r1",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_pipeline_args(p, pipeline_optional=stage == "download")
        if stage == "download":
            p.add_argument(
                "--retry-failed",
                action="store_true",
                help="re-attempt URLs whose failure was transient (timeouts, 5xx, resets) in "
                "finished shards, keeping successes; the pipeline defaults to the one saved "
                "in --out",
            )

    p = sub.add_parser(
        "status",
        help="show each stage's state and counts",
        epilog="example:\n  wit-build status runs/r1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR")

    p = sub.add_parser(
        "sql",
        help="run SQL (DuckDB) over the run's metadata",
        description="Views: queries, candidates, matched, selected, query_counts, samples "
        "(every download attempt), filtered, kept, shards (one row per final sample), dropped "
        "(every selected sample that did not reach the shards: stage + reason). Read-only: "
        "only SELECT/DESCRIBE/SUMMARIZE/EXPLAIN, and no file outside the run is read or written "
        "(COPY, EXPORT, ATTACH, INSTALL, LOAD, read_text/read_csv of other files are refused, exit 2).",
        epilog="examples:\n"
        '  wit-build sql runs/r1 "SELECT status, count(*) FROM samples GROUP BY 1"\n'
        "  wit-build sql runs/r1 --schema\n"
        '  wit-build sql runs/r1 "SELECT stage, reason, count(*) FROM dropped GROUP BY ALL ORDER BY 3 DESC"\n'
        '  wit-build sql runs/r1 "FROM shards" --format parquet --output shards.parquet',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("query", metavar="QUERY", nargs="?", help="SQL; optional with --schema")
    p.add_argument("--schema", action="store_true", help="list every view with its columns and types")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        default="table",
        help="table (default; control characters escaped), csv, json (JSON Lines) or parquet (needs --output)",
    )
    p.add_argument(
        "--output", metavar="FILE", help="write the result here (local path or fsspec URL) instead of stdout"
    )
    p.add_argument("--max-rows", type=_non_negative, default=50, help="table rows to print (0 = all; default 50)")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="lift read-only mode: any statement, any file, extension installs (trusted use only)",
    )

    p = sub.add_parser(
        "stats",
        help="write a report (HTML + PNG plots) of a run",
        description="A grid of sample images with captions, stage funnel and time per stage, "
        "drop reasons, samples removed for safety, top domains and their failure rates, error "
        "types, image size and aspect histograms, per-query counts (before and after balancing, "
        "after the final trim), caption lengths, and the commands that train on the shards; "
        "written to DIR/report/report.html with PNG plots beside it.",
        epilog="example:\n  wit-build stats runs/r1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR")

    p = sub.add_parser(
        "serve",
        help="browse a run in a local web app (thumbnails, filters, per-query pages)",
        description="A read-only web app over a run (local dir or s3://...): a grid of the "
        "downloaded samples with caption, query, status and drop reason, filters and caption "
        "search, one page per sample, and the per-query distribution before and after the cap.",
        epilog="examples:\n  wit-build serve runs/r1 --port 8000   # then open http://127.0.0.1:8000/\n"
        "  wit-build serve --clear-cache         # delete every cached index, then exit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR", nargs="?", help="the run (required unless --clear-cache)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_non_negative, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--cache-dir",
        help="where the run's index (a DuckDB file, built on the first serve of the run as it is, reused "
        "after) is kept (default $XDG_CACHE_HOME/wit-builder/serve or ~/.cache/wit-builder/serve)",
    )
    p.add_argument(
        "--memory-limit",
        default="1GB",
        help="DuckDB memory limit while building the index and serving (default 1GB; the build spills "
        "to disk beyond it)",
    )
    p.add_argument(
        "--cache-max-gb",
        type=_non_negative_float,
        default=10.0,
        help="bound on the cached indexes' total size: beyond it the least recently served go first, "
        "never the one being served; indexes of deleted local runs go anyway (default 10; 0 keeps "
        "only the one being served)",
    )
    p.add_argument(
        "--clear-cache",
        action="store_true",
        help="delete every cached index first (a build still running keeps its files); without DIR, then exit",
    )

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline + a few CPU training steps on the bundled demo data",
        description="Serves the bundled demo photos from a local HTTP server on 127.0.0.1, "
        "runs pipelines/demo.toml end to end with embedded Ray, trains a tiny CLIP for a "
        "few CPU steps, evaluates zero-shot, and prints a summary.",
        epilog="example:\n  wit-build demo --out runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--pipeline", default=None, help="default: pipelines/demo.toml of this repo")
    p.add_argument("--no-train", action="store_true", help="skip the training and zero-shot steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _check_run_dir(run_dir: str) -> None:
    """A run directory exists and holds a run (pipeline.json, written when a run starts)."""
    from wit_builder import io
    from wit_builder.config import ConfigError

    if not io.exists(run_dir):
        raise ConfigError(f"run directory not found: {run_dir}")
    if not io.exists(io.join(run_dir, "pipeline.json")):
        raise ConfigError(f"{run_dir} is not a wit-build run directory (no pipeline.json)")


def _load(pipeline_path: str | None, out: str, overrides: list[str]):
    from wit_builder import io
    from wit_builder.config import ConfigError
    from wit_builder.pipeline import load_pipeline

    if pipeline_path is None or os.path.isdir(pipeline_path):
        run_dir = pipeline_path or out
        if not run_dir:
            raise ConfigError("give a pipeline TOML and --out DIR (or a run directory with --retry-failed)")
        saved = io.join(run_dir, "pipeline.json")
        if not io.exists(saved):
            raise ConfigError(f"no pipeline given and none saved in {run_dir} (pipeline.json)")
        data = io.read_json(saved)
        return (
            load_pipeline(data["source"], list(data.get("overrides", [])) + overrides),
            run_dir,
            list(data.get("overrides", [])) + overrides,
        )
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a directory")
    return load_pipeline(pipeline_path, overrides), out, overrides


def _cmd_run(args: argparse.Namespace, stages: list[str] | None) -> int:
    from wit_builder.runner import run_pipeline

    pipeline, out, overrides = _load(args.pipeline, args.out, args.overrides)
    run_pipeline(
        pipeline,
        out,
        stages=stages,
        from_stage=getattr(args, "from_stage", None),
        force=args.force,
        ray_address=args.ray_address,
        overrides=overrides,
    )
    return 0


def _cmd_retry_failed(args: argparse.Namespace) -> int:
    from wit_builder.runner import retry_failed_downloads, say

    pipeline, out, _ = _load(args.pipeline, args.out, args.overrides)
    result = retry_failed_downloads(pipeline, out, args.ray_address)
    say(result.line("download --retry-failed"))
    if result.extra["rewritten"]:
        say(
            f"{result.extra['rewritten']} download shard(s) changed: filter and shards are out of date; "
            f"`wit-build run {args.pipeline} --out {out}` redoes them"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from wit_builder.runner import stage_states

    _check_run_dir(args.run_dir)
    print(f"run: {args.run_dir}")
    for st in stage_states(args.run_dir):
        if st.result:
            r = st.result
            drops = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()) if v) or "-"
            print(f"  {st.name:<11} {st.state:<8} in={r.rows_in:<9} out={r.rows_out:<9} dropped: {drops}")
        else:
            print(f"  {st.name:<11} {st.state}")
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from wit_builder.catalog import sql_command

    _check_run_dir(args.run_dir)
    return sql_command(
        args.run_dir,
        args.query,
        schema=args.schema,
        fmt=args.format,
        output=args.output,
        max_rows=args.max_rows,
        unsafe=args.unsafe,
    )


def _cmd_stats(args: argparse.Namespace) -> int:
    from wit_builder.report import write_report

    _check_run_dir(args.run_dir)
    print(write_report(args.run_dir))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from wit_builder.browse_index import clear_cache, resolve_cache_dir
    from wit_builder.config import ConfigError

    if args.clear_cache:
        cleared = clear_cache(args.cache_dir)
        print(
            f"cleared {resolve_cache_dir(args.cache_dir)}: "
            f"{cleared.evicted} index(es) and {cleared.other} other file(s) removed "
            f"({cleared.freed / 1e6:,.0f} MB freed)",
            flush=True,
        )
        if args.run_dir is None:
            return 0
    elif args.run_dir is None:
        raise ConfigError("serve: the run directory DIR is required (or --clear-cache alone)")
    from wit_builder.serve import serve

    _check_run_dir(args.run_dir)
    return serve(
        args.run_dir,
        host=args.host,
        port=args.port,
        cache_dir=args.cache_dir,
        memory_limit=args.memory_limit,
        cache_max_bytes=int(args.cache_max_gb * 1e9),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from wit_builder.demo import run_demo

    return run_demo(out=args.out, pipeline_path=args.pipeline, train=not args.no_train, overrides=args.overrides)


class _Terminated:
    """SIGTERM (what `timeout`, Slurm and Kubernetes send) handled as Ctrl-C: the handler raises
    KeyboardInterrupt in the main thread, so the same clean-up runs (in-flight Ray tasks
    cancelled, the run dir's lease released) and `main` exits 143 instead of 130. A second
    SIGTERM during that clean-up is ignored (the sender's SIGKILL follows anyway)."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.received:
            self.received = True
            raise KeyboardInterrupt


def _install_sigterm(terminated: _Terminated):
    """Install the handler (main thread only; the runner keeps it across `ray.init`); returns
    the previous one, or None when nothing was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, terminated)


def _stop_ray() -> None:
    """Shut an embedded Ray down now (its workers and daemons), not at interpreter exit."""
    if "ray" not in sys.modules:  # never started: nothing to stop (and no import of ray)
        return
    try:
        from wit_builder import parallel

        parallel.shutdown()
    except Exception:  # already half down; exiting is what matters here
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wit_builder.config import ConfigError

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    terminated = _Terminated()
    previous = _install_sigterm(terminated)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return code
    except ConfigError as e:
        print(f"wit-build: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        by_sigterm = terminated.received
        terminated.received = True  # from here on a SIGTERM is ignored
        _stop_ray()
        by = " (SIGTERM)" if by_sigterm else ""
        print(f"\nwit-build: interrupted{by}; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if by_sigterm else 130
    except BrokenPipeError:  # `wit-build status DIR | head`: the reader left; stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as e:  # an unforeseen failure: one clear line, the traceback on request
        if os.environ.get("WIT_DEBUG"):
            raise
        print(
            f"wit-build: failed: {type(e).__name__}: {_first_line(e)}\n"
            "(set WIT_DEBUG=1 for the traceback; rerunning the same command resumes)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:  # main() called in-process (tests): leave the handler as found
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    from wit_builder.config import ConfigError

    if args.command == "run":
        return _cmd_run(args, None)
    if args.command in STAGE_ORDER:
        if args.command == "download" and args.retry_failed:
            return _cmd_retry_failed(args)
        if args.pipeline is None:
            raise ConfigError(f"wit-build {args.command}: a pipeline TOML is required")
        return _cmd_run(args, [args.command])
    commands = {"status": _cmd_status, "sql": _cmd_sql, "stats": _cmd_stats, "serve": _cmd_serve, "demo": _cmd_demo}
    return commands[args.command](args) if args.command in commands else 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
