"""HTTPS through our fetch: we connect to the checked IP, yet TLS verifies the host name (SNI)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time

import pytest

from hostile_server import _Handler, _Server
from wit_builder.fetch import Fetcher, FetchSettings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=img.test",
            "-addext",
            "subjectAltName=DNS:img.test",
        ],
        check=True,
        capture_output=True,
    )
    srv = _Server(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv.server_address[1], cert
    srv.shutdown()
    srv.server_close()


def _fetcher(cert: str | None, verify: bool = True, **kw) -> Fetcher:
    names = {"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    opts = dict(timeout=2.0, allowed_networks=("127.0.0.1/32",), verify_tls=verify)
    opts.update(kw)
    f = Fetcher(FetchSettings(**opts), resolver=lambda host, port: names[host])
    if cert:
        f._ssl.load_verify_locations(cert)  # trust the test's self-signed certificate
    return f


def test_https_verified_by_host_name_while_connecting_to_the_checked_ip(tls_server):
    port, cert = tls_server
    res = _fetcher(cert).fetch(f"https://img.test:{port}/good.jpg")
    assert res.error is None and res.data[:2] == b"\xff\xd8"


def test_https_name_mismatch_or_untrusted_is_refused(tls_server):
    port, cert = tls_server
    assert _fetcher(cert).fetch(f"https://other.test:{port}/good.jpg").error == "tls_error"
    assert _fetcher(None).fetch(f"https://img.test:{port}/good.jpg").error == "tls_error"
    assert _fetcher(None, verify=False).fetch(f"https://other.test:{port}/good.jpg").error is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/trickle-huge.jpg", "/trickle-chunked.jpg"])
def test_https_dripping_body_is_cut_at_the_total_deadline(tls_server, path):
    # issue 10: a 200 MB cap admits the announced body; the watchdog still ends it at the deadline
    port, cert = tls_server
    t = time.monotonic()
    res = _fetcher(cert, timeout=1.0, max_bytes=200_000_000).fetch(f"https://img.test:{port}{path}")
    assert res.error == "timeout" and res.data is None
    assert time.monotonic() - t < 1.5
