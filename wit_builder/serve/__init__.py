"""`wit-build serve DIR`: a local, read-only web app to browse a run (Flask).

Pages: `/` a grid of thumbnails with caption, query, status and drop reason, filtered by
query, stage, status, reason, language, original size and a caption search, with counts per
choice; `/sample/<key>` everything known about one sample; `/queries` the per-query
distribution (head or tail, before or after the cap) linking to the samples; `/image/<key>`
the image bytes, read by offset from the run's tars. All data access is in
`wit_builder.browse`. Every string from the data is escaped by Jinja2's autoescaping, only
http(s) URLs become links, and a Content-Security-Policy without any script source is sent
with every response (the pages have no JavaScript).

Example:
    >>> app = create_app(Browser("runs/demo"))                        # doctest: +SKIP
    >>> app.test_client().get("/").status_code                       # doctest: +SKIP
    200
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, render_template, request, url_for

from wit_builder.browse import DISTRIBUTION_ORDERS, STATUSES, Browser, Filters
from wit_builder.browse_index import DEFAULT_CACHE_MAX_BYTES, DEFAULT_MEMORY_LIMIT

PAGE_SIZE = 60
QUERY_PAGE_SIZE = 50
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# grid filters: URL parameter -> (Filters field, parser)
INT_PARAMS = {"q": "query_id", "min_w": "min_width", "max_w": "max_width", "min_h": "min_height", "max_h": "max_height"}
TEXT_PARAMS = {"stage": "stage", "status": "status", "reason": "reason", "lang": "lang", "text": "text"}


def http_url(url: Any) -> str | None:
    """`url` when it is an http(s) URL with a host, else None (so it is shown, never linked).

    >>> http_url("https://a.org/x.jpg"), http_url("javascript:alert(1)"), http_url(" JavaScript:x")
    ('https://a.org/x.jpg', None, None)
    """
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc and url == url.strip() else None


def _int_arg(name: str, minimum: int = 0) -> int | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        abort(400, f"{name} must be a whole number, got {raw!r}")
    if value < minimum:
        abort(400, f"{name} must be >= {minimum}, got {value}")
    return value


def filters_from_request() -> Filters:
    """The grid's Filters from the URL's parameters (400 on a malformed number)."""
    values: dict[str, Any] = {field: _int_arg(param) for param, field in INT_PARAMS.items()}
    for param, field in TEXT_PARAMS.items():
        raw = request.args.get(param, "").strip()
        values[field] = raw or None
    return Filters(**values)


def create_app(browser: Browser) -> Flask:
    """The Flask app over one Browser (one run)."""
    app = Flask(__name__)
    app.config["BROWSER"] = browser
    app.jinja_env.globals.update(http_url=http_url, run_dir=browser.run_dir)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        return resp

    @app.errorhandler(400)
    @app.errorhandler(404)
    def _error(e: Any) -> tuple[str, int]:
        return render_template("error.html", code=e.code, message=e.description), e.code

    def link(**changes: Any) -> str:
        """The current grid URL with `changes` applied (None removes a parameter; page resets)."""
        args = {k: v for k, v in request.args.items() if v != ""}
        args.pop("page", None)
        for k, v in changes.items():
            if v is None:
                args.pop(k, None)
            else:
                args[k] = v
        return url_for("grid", **args)

    app.jinja_env.globals["link"] = link

    @app.get("/")
    def grid() -> str:
        f = filters_from_request()
        if f.status is not None and f.status not in STATUSES:
            abort(400, f"status must be one of {', '.join(STATUSES)}")
        page = _int_arg("page", 1) or 1
        total = browser.count(f)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        rows = browser.page(f, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        return render_template(
            "grid.html",
            f=f,
            rows=rows,
            total=total,
            page=page,
            pages=pages,
            facets=browser.facets(f),
            query_text=browser.query_text(f.query_id) if f.query_id is not None else None,
            has_samples=browser.has_samples,
            has_lang=browser.has_lang,
            args=request.args,
        )

    @app.get("/sample/<key>")
    def sample(key: str) -> str:
        wide = request.args.get("wide") == "1"
        info = browser.sample(key, wide=wide)
        if info is None:
            abort(404, f"no sample with key {key!r} in this run")
        return render_template("sample.html", key=key, info=info, wide=wide)

    @app.get("/queries")
    def queries() -> str:
        order = request.args.get("order", "containing")
        if order not in DISTRIBUTION_ORDERS:
            abort(400, f"order must be one of {', '.join(DISTRIBUTION_ORDERS)}")
        tail = request.args.get("end", "head") == "tail"
        page = _int_arg("page", 1) or 1
        total = browser.distribution_size(order)
        rows = browser.distribution(order, tail=tail, offset=(page - 1) * QUERY_PAGE_SIZE, limit=QUERY_PAGE_SIZE)
        peak = max([r[order] or 0 for r in rows] + [1])
        return render_template(
            "queries.html",
            rows=rows,
            order=order,
            orders=DISTRIBUTION_ORDERS,
            tail=tail,
            page=page,
            pages=max(1, math.ceil(total / QUERY_PAGE_SIZE)),
            total=total,
            peak=peak,
        )

    @app.get("/image/<key>")
    def image(key: str) -> Response:
        found = browser.image(key)
        if found is None:
            abort(404, f"no image for key {key!r}")
        data, ext = found
        resp = Response(data, mimetype=CONTENT_TYPES.get(ext, "application/octet-stream"))
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    return app


def serve(
    run_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    cache_dir: str | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
) -> int:
    """Open (or, on the first serve of the run as it is, build) the run's index in `cache_dir`
    (tidied down to `cache_max_bytes`, see browse_index.tidy_cache), then serve it on
    http://host:port until Ctrl-C (werkzeug's threaded server). Raises ConfigError for a missing
    run dir, a port that is taken, a bad memory limit or cache dir."""
    import socket
    import time

    from werkzeug.serving import make_server

    from wit_builder.config import ConfigError

    def taken(e: OSError) -> ConfigError:
        return ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another with --port)")

    try:  # fail fast, before indexing a large run
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise taken(e) from None
    started = time.monotonic()
    browser = Browser(
        run_dir,
        cache_dir=cache_dir,
        memory_limit=memory_limit,
        log=lambda m: print(m, flush=True),
        cache_max_bytes=cache_max_bytes,
    )
    n = browser.count(Filters())
    print(f"{n:,} samples ready in {time.monotonic() - started:.1f} s", flush=True)
    try:
        server = make_server(host, port, create_app(browser), threaded=True)
    except OSError as e:
        raise taken(e) from None
    print(f"serving {run_dir} on http://{host}:{server.port}/ (read-only; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl-C (and SIGTERM, which `main` turns into one)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("stopped", flush=True)
    return 0
