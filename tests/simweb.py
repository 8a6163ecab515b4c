"""A simulated web on loopback: hundreds of host names, their DNS, and a realistic mix of failures.

One server process (aiohttp + asyncio) answers, for every live host, HTTP on its own address
127.10.x.y (all on one port), and DNS on 127.0.0.1 (UDP): live and "refused" hosts resolve
to their address (a refused host's address has no listener: connection refused), "nxdomain"
hosts get NXDOMAIN, "dns_silent" hosts get no answer at all (a DNS timeout). Nothing binds
outside 127.0.0.0/8 and no system file is touched: a client reaches these names only through
this DNS server (our fetch: `[download] dns_servers`; img2dataset: `sitecustomize_dir()`, which
routes Python's getaddrinfo for `*.test` names to it).

The mix, and where each figure comes from:
- URLs per host: Zipf with exponent 0.9 over the hosts (MEASURED on the 10,000 LAION URLs in
  ../shared/data/captions/laion_10k.parquet: 4,474 hosts, the top one 6.4% of URLs, log-log
  rank-frequency slope -0.90 over the top 300 hosts). The 10 biggest hosts are always live
  (they are CDNs in the real list: shopify, dreamstime, pinimg, ...).
- URL outcomes on live hosts: 404 7%, 403 2%, 5xx 1%, HTML page 1%, X-Robots-Tag opt-out
  0.5%, reset 0.3%, huge image (~3 MB, 4000 px) 0.5%, redirect to the image 2%, image the rest
  (FROM PUBLISHED img2dataset stats.json files of LAION downloads, not measured here: 404
  5.9-8.7%, 403 1.4-1.9%, decode errors 0.6%, resets <0.1%, X-Robots 0.5%, success 81-85%).
- Host kinds among the other hosts: nxdomain 4%, refused 2%, dns_silent 1%, slow 3%
  (0.3-1.5 s before the headers), trickle 1% (the body at ~16 KB/s) (ASSUMPTIONS, chosen so
  that overall success lands near the published ~80%).
- Images: the real COCO photos of ../shared/data/images/coco_mini (or demo/images; the tests use
  demo/images, and the photo drawn for a URL comes from its own random stream), served as
  they are (real JPEG sizes, ~160 KB).

The server logs connections per host (by the local address a connection came in on, from
accept to close), so `stats()["peak_per_host"]` is the most connections a host ever had open
at once; also requests and bytes sent per kind, and DNS queries.

Example:
    >>> spec = build_spec(n_urls=50, n_hosts=20, seed=1, photos_dir=PHOTOS_FALLBACK)
    >>> len(spec["urls"]), len(spec["hosts"])
    (50, 20)
    >>> with SimWeb(spec) as web:                      # doctest: +SKIP
    ...     web.stats()["requests"]
    0
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "images", "coco_mini")
PHOTOS_FALLBACK = os.path.join(os.path.dirname(HERE), "demo", "images")
ZIPF_S = 0.9
ALWAYS_LIVE = 10
HOST_KINDS = {"nxdomain": 0.04, "refused": 0.02, "dns_silent": 0.01, "slow": 0.03, "trickle": 0.01}
URL_KINDS = {
    "404": 0.07,
    "403": 0.02,
    "500": 0.01,
    "html": 0.01,
    "optout": 0.005,
    "reset": 0.003,
    "huge": 0.005,
    "redirect": 0.02,
}
TRICKLE_BYTES_PER_S = 16_000


def photos_dir() -> str:
    return PHOTOS if os.path.isdir(PHOTOS) else PHOTOS_FALLBACK


def host_ip(k: int) -> str:
    """127.10.x.y for host k (y in 1..250)."""
    return f"127.10.{k // 250}.{k % 250 + 1}"


def build_spec(
    n_urls: int,
    n_hosts: int,
    seed: int = 0,
    photos_dir: str | None = None,
    host_kinds: dict[str, float] | None = None,
    url_kinds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Host names, their kinds and the URL list (deterministic for a seed)."""
    rng = random.Random(seed)
    host_kinds = HOST_KINDS if host_kinds is None else host_kinds
    url_kinds = URL_KINDS if url_kinds is None else url_kinds
    hosts = []
    for k in range(n_hosts):
        kind, latency = "ok", 0.0
        if k >= ALWAYS_LIVE:
            r, acc = rng.random(), 0.0
            for name, share in host_kinds.items():
                acc += share
                if r < acc:
                    kind = name
                    break
        if kind == "slow":
            latency = rng.uniform(0.3, 1.5)
        hosts.append({"name": f"img{k:04d}.host{k:04d}.test", "ip": host_ip(k), "kind": kind, "latency": latency})
    weights = [1.0 / (k + 1) ** ZIPF_S for k in range(n_hosts)]
    picks = rng.choices(range(n_hosts), weights=weights, k=n_urls)
    photos = sorted(f for f in os.listdir(photos_dir or globals()["photos_dir"]()) if f.lower().endswith(".jpg"))
    photo_rng = random.Random(f"{seed}-photos")  # the hosts and URL kinds do not depend on the photos
    urls = []
    for i, k in enumerate(picks):
        r, acc, kind = rng.random(), 0.0, "img"
        for name, share in url_kinds.items():
            acc += share
            if r < acc:
                kind = name
                break
        urls.append(f"http://{hosts[k]['name']}/{kind}/{i}-{photo_rng.randrange(len(photos))}.jpg")
    return {"hosts": hosts, "urls": urls, "photos_dir": photos_dir or globals()["photos_dir"](), "seed": seed}


# -- the server process ------------------------------------------------------------------------


def _huge_jpeg(src: str) -> bytes:
    """A ~3 MB, 4000 px JPEG made once from a real photo (cached in the temp dir)."""
    path = os.path.join(tempfile.gettempdir(), "wb_simweb_huge.jpg")
    if not os.path.exists(path):
        from PIL import Image

        with Image.open(src) as im:
            big = im.convert("RGB").resize((4000, 3000), Image.BICUBIC)
        tmp = f"{path}.{os.getpid()}.tmp"
        big.save(tmp, "JPEG", quality=92)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        return f.read()


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, web: _Server):
        self.web = web

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        self.web.counts["dns_queries"] += 1
        if self.web.dns_mode == "silent":
            return
        try:
            q = dns.message.from_wire(data)
            question = q.question[0]
        except Exception:
            return
        name = question.name.to_text(omit_final_dot=True).lower()
        host = self.web.by_name.get(name)
        resp = dns.message.make_response(q)
        if host is None or host["kind"] == "nxdomain":
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif host["kind"] == "dns_silent":
            return
        elif question.rdtype == dns.rdatatype.A:
            resp.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", host["ip"]))
        self.transport.sendto(resp.to_wire(), addr)


class _Server:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.by_name = {h["name"]: h for h in spec["hosts"]}
        self.by_ip = {h["ip"]: h for h in spec["hosts"]}
        pdir = spec["photos_dir"]
        names = sorted(f for f in os.listdir(pdir) if f.lower().endswith(".jpg"))
        self.photos = []
        for n in names:
            with open(os.path.join(pdir, n), "rb") as f:
                self.photos.append(f.read())
        self.huge = _huge_jpeg(os.path.join(pdir, names[0]))
        self.dns_mode = "normal"
        self.reset()

    def reset(self) -> None:
        self.counts: Counter = Counter()
        self.open: Counter = Counter()
        self.peak: Counter = Counter()

    # connection log: from accept to close, by the local address the connection came in on
    def conn_made(self, transport) -> None:
        ip = (transport.get_extra_info("sockname") or ("?",))[0]
        name = self.by_ip.get(ip, {"name": ip})["name"]
        self.open[name] += 1
        self.counts["connections"] += 1
        if self.open[name] > self.peak[name]:
            self.peak[name] = self.open[name]
        return name

    def conn_lost(self, name: str) -> None:
        self.open[name] -= 1

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.counts["requests"],
            "bytes_sent": self.counts["bytes_sent"],
            "connections": self.counts["connections"],
            "dns_queries": self.counts["dns_queries"],
            "by_kind": {k[5:]: v for k, v in self.counts.items() if k.startswith("kind:")},
            "peak_per_host": dict(self.peak),
            "open_now": sum(self.open.values()),
        }

    async def handle(self, request):
        from aiohttp import web

        host = self.by_name.get(request.host.split(":")[0].lower())
        local = (request.transport.get_extra_info("sockname") or ("?",))[0] if request.transport else "?"
        if host is None or host["ip"] != local:
            return web.Response(status=421, text="misdirected")
        self.counts["requests"] += 1
        parts = request.path.strip("/").split("/")
        kind = parts[0] if len(parts) == 2 else "404"
        self.counts[f"kind:{kind}"] += 1
        if host["latency"]:
            await asyncio.sleep(host["latency"])
        try:
            idx = int(parts[1].split("-")[1].split(".")[0]) % len(self.photos)
        except (IndexError, ValueError):
            idx = 0
        if kind in ("404", "403", "500"):
            return self._count(web.Response(status=int(kind), text="no", content_type="text/html"))
        if kind == "html":
            page = "<html><body>" + "<p>not an image</p>" * 200 + "</body></html>"
            return self._count(web.Response(text=page, content_type="text/html"))
        if kind == "redirect":
            raise web.HTTPFound(f"/img/{parts[1]}")
        if kind == "reset":
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            request.transport.close()  # RST
            return web.Response(status=500)
        body = self.huge if kind == "huge" else self.photos[idx]
        headers = {"X-Robots-Tag": "noai"} if kind == "optout" else {}
        if host["kind"] == "trickle":
            resp = web.StreamResponse(headers={**headers, "Content-Type": "image/jpeg"})
            resp.content_length = len(body)
            await resp.prepare(request)
            step = TRICKLE_BYTES_PER_S // 10
            for i in range(0, len(body), step):
                await resp.write(body[i : i + step])
                self.counts["bytes_sent"] += len(body[i : i + step])
                await asyncio.sleep(0.1)
            return resp
        return self._count(web.Response(body=body, content_type="image/jpeg", headers=headers))

    def _count(self, resp):
        self.counts["bytes_sent"] += len(resp.body or b"")
        return resp

    async def control(self, request):
        from aiohttp import web

        if request.path == "/_reset":
            self.reset()
        elif request.path == "/_dns":
            self.dns_mode = request.query.get("mode", "normal")
        return web.json_response(self.stats())


async def _serve(spec: dict[str, Any]) -> None:
    from aiohttp import web

    srv = _Server(spec)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    server = runner.server
    made, lost = server.connection_made, server.connection_lost

    conn_host: dict[int, str] = {}  # RequestHandler has __slots__: its host is kept here

    def connection_made(handler, transport):
        conn_host[id(handler)] = srv.conn_made(transport)
        made(handler, transport)

    def connection_lost(handler, exc):
        srv.conn_lost(conn_host.pop(id(handler)))
        lost(handler, exc)

    server.connection_made, server.connection_lost = connection_made, connection_lost

    live = [h for h in spec["hosts"] if h["kind"] not in ("nxdomain", "refused", "dns_silent")]
    for _ in range(20):  # one port free on every live host's address
        port = _free_port()
        socks = []
        try:
            for h in live:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                socks.append(s)
                s.bind((h["ip"], port))
                s.listen(1024)
            break
        except OSError:
            for s in socks:
                s.close()
    else:
        raise SystemExit("simweb: no port free on every host address")
    for s in socks:
        await web.SockSite(runner, s).start()

    ctl = web.Application()
    ctl.router.add_route("*", "/{tail:.*}", srv.control)
    ctl_runner = web.AppRunner(ctl, access_log=None)
    await ctl_runner.setup()
    ctl_site = web.TCPSite(ctl_runner, "127.0.0.1", 0)
    await ctl_site.start()
    ctl_port = ctl_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Dns(srv), local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    print(json.dumps({"port": port, "dns_port": dns_port, "ctl_port": ctl_port}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    transport.close()
    await runner.cleanup()
    await ctl_runner.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the client side ---------------------------------------------------------------------------


class SimWeb:
    """Start the server process for `spec`; `urls`, `dns_server`, `stats()`, `stop()`."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self._dir = tempfile.mkdtemp(prefix="wb_simweb_")
        path = os.path.join(self._dir, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"simweb server did not start (exit {self.proc.returncode})")
        ready = json.loads(line)
        self.port, self.dns_port, self.ctl_port = ready["port"], ready["dns_port"], ready["ctl_port"]
        self.dns_server = f"127.0.0.1:{self.dns_port}"
        self.urls = [u.replace(".test/", f".test:{self.port}/", 1) for u in spec["urls"]]

    def _ctl(self, path: str) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.ctl_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._ctl("/_stats")

    def reset(self) -> dict[str, Any]:
        return self._ctl("/_reset")

    def set_dns(self, mode: str) -> None:
        """ "normal", or "silent": the DNS server answers nothing (a resolver that never answers)."""
        self._ctl(f"/_dns?mode={mode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SimWeb:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


SITECUSTOMIZE = '''
"""simweb: route Python's getaddrinfo for *.test names to the simulated web's DNS server."""
import os, socket
_server = os.environ.get("SIMWEB_DNS")
if _server:
    import dns.resolver
    _ip, _port = _server.rsplit(":", 1)
    _res = dns.resolver.Resolver(configure=False)
    _res.nameservers = [_ip]
    _res.port = int(_port)
    _res.cache = None
    _orig = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if not (isinstance(name, str) and name.rstrip(".").endswith(".test")):
            return _orig(host, port, family, type, proto, flags)
        try:
            ans = _res.resolve(name, "A", lifetime=5.0, search=False)
        except dns.resolver.NXDOMAIN:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        except Exception:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution") from None
        ip = ans.rrset[0].address
        return _orig(ip, port, family, type, proto, flags)

    socket.getaddrinfo = getaddrinfo
'''


def sitecustomize_dir() -> str:
    """A directory with a sitecustomize.py for PYTHONPATH (a process that cannot take our
    resolver: it then asks the simulated DNS, given in SIMWEB_DNS=IP:PORT, for *.test names
    — a lookup per connection, like the system resolver without a cache)."""
    d = tempfile.mkdtemp(prefix="wb_simweb_site_")
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    return d


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        _spec = json.load(f)
    try:
        asyncio.run(_serve(_spec))
    except KeyboardInterrupt:
        pass
    time.sleep(0)
