"""A local static HTTP server on 127.0.0.1 at a free port, for the demo and the tests.

Example:
    >>> import tempfile, urllib.request, os
    >>> d = tempfile.mkdtemp(); open(os.path.join(d, "a.txt"), "w").write("hi")
    2
    >>> s = serve_directory(d)
    >>> urllib.request.urlopen(s.base_url + "/a.txt").read()
    b'hi'
    >>> s.stop()
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class RunningServer:
    base_url: str
    httpd: ThreadingHTTPServer
    thread: threading.Thread

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve_directory(root: str, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve `root` in a daemon thread; port 0 picks a free port."""
    handler = functools.partial(_QuietHandler, directory=root)
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True, name="demo-http")
    thread.start()
    return RunningServer(f"http://{host}:{httpd.server_address[1]}", httpd, thread)
