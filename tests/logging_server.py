"""A static HTTP server on one loopback address that records every request path, for tests
that check what was (never) requested. `/r?to=URL` answers 302 to URL.

Example:
    >>> import tempfile, urllib.request
    >>> root = tempfile.mkdtemp(); open(f"{root}/a.txt", "w").write("hi")
    2
    >>> s = LoggingServer(root, "127.0.0.1")
    >>> urllib.request.urlopen(f"{s.base}/a.txt").read(), s.requests
    (b'hi', ['/a.txt'])
    >>> s.stop()
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class LoggingServer:
    """Serves `root` on `host` (port chosen by the OS); `requests` lists every path asked for."""

    def __init__(self, root: str, host: str = "127.0.0.1"):
        self.requests: list[str] = []
        log = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                log.append(self.path)
                if self.path.startswith("/r?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/r?to=") :])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer((host, 0), functools.partial(Handler, directory=root))
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
