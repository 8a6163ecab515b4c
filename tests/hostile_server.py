"""A hostile HTTP server on 127.0.0.1 for the download tests: good and bad images, bad servers.

Every route and what a correct downloader must make of it (EXPECTED: path -> error reason,
None = success). Routes outside EXPECTED, for tests with their own settings:
/huge/{n}.jpg, /huge-chunked/{n}.jpg and /huge-close/{n}.jpg (an n-byte body with a
Content-Length, chunked, or until close), /trickle-huge.jpg (announces TRICKLE_DECLARED bytes,
then drips) and /trickle-chunked.jpg (one-byte chunks, dripped).

Images are generated in memory (small, deterministic); the 20000x20000 PNG bomb is built on
the fly as a 1-bit PNG (~50 KB compressed, 400 Mpx decoded).

Example:
    >>> s = HostileServer(); import urllib.request
    >>> urllib.request.urlopen(s.url("/good.jpg")).read()[:2]
    b'\\xff\\xd8'
    >>> s.stop()
"""

from __future__ import annotations

import io
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

BIG_BODY = 3_000_000  # bytes served by /big.jpg; tests cap max_bytes below this
DRIP_INTERVAL = 0.2  # seconds between bytes of /slow.jpg
TRICKLE_DECLARED = 150_000_000  # Content-Length announced by /trickle-huge.jpg (drips forever)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A deterministic RGB test picture (smooth gradient + a block + noise), distinct per seed."""
    rng = np.random.RandomState(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, seed % 256)], -1)
    arr = arr + rng.randint(0, 24, arr.shape)
    arr[h // 4 : h // 2, w // 4 : w // 2] = rng.randint(0, 256, 3)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels, compressed to a few tens of KB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_assets() -> dict[str, tuple[bytes, str, dict[str, str]]]:
    """path -> (body, content type, extra headers)."""
    base = photo(1, (320, 240))
    a: dict[str, tuple[bytes, str, dict[str, str]]] = {}
    a["/good.jpg"] = (_save(base, "JPEG", quality=90), "image/jpeg", {})
    a["/good.png"] = (_save(photo(2, (200, 150)), "PNG"), "image/png", {})
    a["/good.webp"] = (_save(photo(3, (200, 150)), "WEBP", quality=90), "image/webp", {})
    a["/good.gif"] = (_save(photo(4, (120, 90)).convert("P"), "GIF"), "image/gif", {})
    a["/gray.jpg"] = (_save(photo(5, (100, 80)).convert("L"), "JPEG"), "image/jpeg", {})
    a["/cmyk.jpg"] = (
        _save(Image.new("RGB", (64, 48), (220, 20, 20)).convert("CMYK"), "JPEG", quality=95),
        "image/jpeg",
        {},
    )
    g16 = Image.fromarray(np.full((40, 60), 0x8000, np.uint16))
    a["/gray16.png"] = (_save(g16, "PNG"), "image/png", {})
    a["/rgb16.png"] = (_rgb16_png(60, 40, (0xFFFF, 0x8000, 0x0000)), "image/png", {})
    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[:, 40:] = (255, 0, 0, 255)  # right half opaque red, left half fully transparent
    a["/alpha.png"] = (_save(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png", {})
    rot = np.zeros((100, 200, 3), np.uint8)
    rot[:, :100] = (255, 0, 0)  # stored landscape: left half red, right half blue
    rot[:, 100:] = (0, 0, 255)
    ex = Image.Exif()
    ex[0x0112] = 6  # display rotated 90 degrees clockwise: portrait, red on top
    a["/exif.jpg"] = (_save(Image.fromarray(rot), "JPEG", quality=95, exif=ex), "image/jpeg", {})
    a["/tiny.png"] = (_save(Image.new("RGB", (1, 1), (0, 128, 255)), "PNG"), "image/png", {})
    a["/html.jpg"] = (b"<!doctype html><html><body>not an image</body></html>", "text/html", {})
    full = _save(photo(6, (320, 240)), "JPEG", quality=90)
    a["/truncated.jpg"] = (full[: len(full) // 2], "image/jpeg", {})
    a["/bomb.png"] = (png_bomb(), "image/png", {})
    a["/noai.jpg"] = (a["/good.jpg"][0], "image/jpeg", {"X-Robots-Tag": "noai"})
    a["/noimageindex.jpg"] = (a["/good.jpg"][0], "image/jpeg", {"X-Robots-Tag": "wit-builder: noimageindex"})
    a["/otherbot-noai.jpg"] = (a["/good.jpg"][0], "image/jpeg", {"X-Robots-Tag": "otherbot: noai"})
    return a


def _rgb16_png(w: int, h: int, rgb: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG of one colour (PIL cannot write these)."""
    px = struct.pack(">HHH", *rgb) * w
    raw = b"".join(b"\x00" + px for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# path -> expected error (None = success) for the static hostile cases
EXPECTED: dict[str, str | None] = {
    "/good.jpg": None,
    "/good.png": None,
    "/good.webp": None,
    "/good.gif": None,
    "/gray.jpg": None,
    "/cmyk.jpg": None,
    "/gray16.png": None,
    "/rgb16.png": None,
    "/alpha.png": None,
    "/exif.jpg": None,
    "/tiny.png": None,
    "/otherbot-noai.jpg": None,
    "/redirect/good.jpg": None,
    "/status/404": "http_404",
    "/status/500": "http_500",
    "/slow.jpg": "timeout",
    "/slow-headers.jpg": "timeout",
    "/reset": "connection_reset",
    "/loop/a": "redirect_loop",
    "/chain/9": "too_many_redirects",
    "/to-ftp": "bad_scheme",
    "/to-file": "bad_scheme",
    "/html.jpg": "not_an_image",
    "/truncated.jpg": "truncated",
    "/bomb.png": "too_many_pixels",
    "/big.jpg": "too_large",
    "/big-chunked.jpg": "too_large",
    "/noai.jpg": "optout",
    "/noimageindex.jpg": "optout",
    "/short-body.jpg": "connection_error",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(
        self,
        code: int,
        body: bytes = b"",
        ctype: str = "text/plain",
        headers: dict | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _redirect(self, location: str) -> None:
        self._send(302, headers={"Location": location})

    def do_GET(self) -> None:  # noqa: C901 - one branch per hostile case
        srv = self.server
        path = self.path.split("?", 1)[0]
        srv.count(path)
        srv.user_agents[path] = self.headers.get("User-Agent", "")
        try:
            if path in srv.assets:
                body, ctype, headers = srv.assets[path]
                return self._send(200, body, ctype, headers)
            if m := re.fullmatch(r"/status/(\d+)", path):
                return self._send(int(m.group(1)), b"error page")
            if path.startswith("/redirect/"):
                return self._redirect(path[len("/redirect") :])
            if path == "/loop/a":
                return self._redirect("/loop/b")
            if path == "/loop/b":
                return self._redirect(srv.base_url + "/loop/a")
            if m := re.fullmatch(r"/chain/(\d+)", path):
                n = int(m.group(1))
                return self._redirect(f"/chain/{n - 1}" if n > 0 else "/good.jpg")
            if path == "/to-ftp":
                return self._redirect("ftp://127.0.0.1/image.jpg")
            if path == "/to-file":
                return self._redirect("file:///etc/passwd")
            if path == "/to-metadata":
                return self._redirect("http://169.254.169.254/latest/meta-data/")
            if path == "/to-name":
                return self._redirect("http://evil.test/x.jpg")
            if path == "/slow.jpg":
                return self._drip()
            if path == "/trickle-huge.jpg":
                return self._drip(TRICKLE_DECLARED)
            if path == "/trickle-chunked.jpg":
                return self._drip_chunked()
            if m := re.fullmatch(r"/huge(|-chunked|-close)/(\d+)\.jpg", path):
                return self._huge(m.group(1), int(m.group(2)))
            if path == "/reset":
                return self._reset()
            if path == "/slow-headers.jpg":
                return self._drip_headers()
            if path == "/big.jpg":
                return self._send(200, srv.assets["/good.jpg"][0] + b"\0" * BIG_BODY, "image/jpeg")
            if path == "/big-chunked.jpg":
                return self._chunked(srv.assets["/good.jpg"][0] + b"\0" * BIG_BODY)
            if path == "/short-body.jpg":
                body = srv.assets["/good.jpg"][0]
                return self._send(200, body[:1000], "image/jpeg", length=len(body))
            if m := re.fullmatch(r"/img/(\d+)\.jpg", path):
                return self._send(200, srv.image(int(m.group(1))), "image/jpeg")
            if m := re.fullmatch(r"/slowimg/(\d+)\.jpg", path):
                time.sleep(srv.slow_delay)
                return self._send(200, srv.image(int(m.group(1))), "image/jpeg")
            if m := re.fullmatch(r"/flaky/(\d+)/(\d+)\.jpg", path):
                if srv.counts[path] <= int(m.group(1)):
                    return self._send(503, b"try later")
                return self._send(200, srv.image(int(m.group(2))), "image/jpeg")
            return self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _drip(self, declared: int = 100000) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.flush()
        body = self.server.assets["/good.jpg"][0]
        for i in range(100000):
            self.wfile.write(body[i % len(body) : i % len(body) + 1])
            time.sleep(DRIP_INTERVAL)

    def _drip_chunked(self) -> None:
        """A chunked body of one-byte chunks, one every DRIP_INTERVAL, with no end."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for _ in range(100000):
            self.wfile.write(b"1\r\n\xff\r\n")
            time.sleep(DRIP_INTERVAL)

    def _huge(self, framing: str, size: int) -> None:
        """A `size`-byte JPEG (zero padded), sent with a Content-Length, chunked or until close."""
        body = self.server.padded(size)
        if framing == "-chunked":
            return self._chunked(body)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if framing == "":
            self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _drip_headers(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
        for _ in range(100000):
            self.wfile.write(b"a")
            time.sleep(DRIP_INTERVAL)

    def _reset(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()
        self.close_connection = True

    def _chunked(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        view = memoryview(body)
        for i in range(0, len(body), 65536):
            part = view[i : i + 65536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler):
        super().__init__(addr, handler)
        self.assets = build_assets()
        self.counts: dict[str, int] = {}
        self.user_agents: dict[str, str] = {}
        self._lock = threading.Lock()
        self._images: dict[int, bytes] = {}
        self._padded: dict[int, bytes] = {}
        self.slow_delay = 0.1
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> None:
        with self._lock:
            self.counts[path] = self.counts.get(path, 0) + 1

    def padded(self, size: int) -> bytes:
        """/good.jpg zero-padded to `size` bytes, built once per size (so serving allocates little)."""
        with self._lock:
            if size not in self._padded:
                good = self.assets["/good.jpg"][0]
                self._padded[size] = good + bytes(max(size - len(good), 0))
            return self._padded[size]

    def image(self, i: int) -> bytes:
        with self._lock:
            if i not in self._images:
                self._images[i] = _save(photo(1000 + i), "JPEG", quality=90)
            return self._images[i]


class HostileServer:
    """The running server: `url(path)`, `counts` (requests per path), `stop()`."""

    def __init__(self) -> None:
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True, name="hostile-http")
        self._thread.start()
        self.base_url = self._srv.base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def counts(self) -> dict[str, int]:
        return self._srv.counts

    @property
    def user_agents(self) -> dict[str, str]:
        return self._srv.user_agents

    def padded(self, size: int) -> bytes:
        """The body /huge*/{size}.jpg serves (built now, so a later request allocates little)."""
        return self._srv.padded(size)

    def set_slow_delay(self, seconds: float) -> None:
        self._srv.slow_delay = seconds

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(timeout=5)
