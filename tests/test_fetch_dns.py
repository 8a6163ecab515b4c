"""Name resolution bounded by the deadline (wit_builder.resolver): dnspython against a DNS server
on loopback, the cache of positive and negative answers, one query per name in flight."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from wit_builder.config import ConfigError
from wit_builder.fetch import Fetcher, FetchSettings, is_transient
from wit_builder.resolver import DnsFailure, Resolver, parse_server
from wit_builder.stages import download


@pytest.fixture
def silent_dns():
    """A UDP socket on loopback that reads nothing and answers nothing."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_silent_server_is_dns_timeout_within_the_deadline(silent_dns):
    r = Resolver([silent_dns])
    t = time.monotonic()
    with pytest.raises(DnsFailure) as e:
        r.resolve("img.example.test", time.monotonic() + 0.4)
    assert e.value.reason == "dns_timeout"
    assert time.monotonic() - t < 0.4 + 0.2
    t = time.monotonic()  # cached: the next URL of that host fails at once
    with pytest.raises(DnsFailure):
        r.resolve("img.example.test", time.monotonic() + 5.0)
    assert time.monotonic() - t < 0.05


def test_fetch_reports_dns_timeout_and_it_is_transient(silent_dns):
    f = Fetcher(FetchSettings(timeout=0.3, dns_servers=(silent_dns,)))
    t = time.monotonic()
    assert f.fetch("http://img.example.test/a.jpg").error == "dns_timeout"
    assert time.monotonic() - t < 0.6
    assert is_transient("dns_timeout") and not is_transient("dns_error")


def test_negative_answers_cached_and_one_query_per_name_in_flight():
    calls: list[str] = []
    gate = threading.Event()

    def lookup(host: str, lifetime: float):
        calls.append(host)
        gate.wait(2)
        if host == "dead.test":
            raise DnsFailure("dns_error")
        return ["127.0.0.9"], 1000.0

    r = Resolver(lookup=lookup)
    out: list = []

    def go(name: str) -> None:
        try:
            out.append(r.resolve(name, time.monotonic() + 3))
        except DnsFailure as e:
            out.append(e.reason)

    threads = [threading.Thread(target=go, args=(n,)) for n in ["live.test"] * 5 + ["dead.test"] * 5]
    for th in threads:
        th.start()
    time.sleep(0.1)
    gate.set()
    for th in threads:
        th.join()
    assert sorted(calls) == ["dead.test", "live.test"]  # ten lookups, two queries
    assert out.count(["127.0.0.9"]) == 5 and out.count("dns_error") == 5
    go("DEAD.test.")  # cached (names are case-insensitive, the root dot optional)
    assert len(calls) == 2 and r.queries == 2


def test_cache_is_bounded():
    r = Resolver(lookup=lambda host, lifetime: (["127.0.0.1"], 300.0), max_entries=3)
    for i in range(10):
        r.resolve(f"h{i}.test", time.monotonic() + 1)
    assert len(r._cache) == 3


def test_dns_servers_key_is_checked():
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    for bad in ("dns.google", "127.0.0.1:0", "[::1]x"):
        with pytest.raises(ValueError):
            parse_server(bad)
    with pytest.raises(ValueError, match="dns_servers"):
        download.Config(dns_servers=["resolver.local:53"])


def test_no_system_resolver_is_a_config_error(monkeypatch):
    import dns.resolver

    def no_conf(*a, **kw):
        raise dns.resolver.NoResolverConfiguration

    monkeypatch.setattr(dns.resolver, "Resolver", no_conf)
    with pytest.raises(ConfigError, match="download.dns_servers"):
        download._check_resolver(download.Config())
    download._check_resolver(download.Config(dns_servers=["127.0.0.1:53"]))  # given: no system file needed


def test_private_address_from_dns_still_refused_by_default():
    f = Fetcher(FetchSettings(timeout=1.0), resolver=lambda host, port: ["127.0.0.1"])
    assert f.fetch("http://img.example.test/a.jpg").error == "private_address"


def test_host_slots_are_shared_by_every_holder_on_the_machine(tmp_path):
    import subprocess
    import sys

    from wit_builder.hostslots import HostSlots

    d = str(tmp_path)
    mine = HostSlots(2, d)
    held = [mine.try_acquire("img.example.test"), mine.try_acquire("IMG.example.test")]
    assert None not in held
    # another process sees both slots taken, and takes one once a slot is released
    probe = (
        "import sys; from wit_builder.hostslots import HostSlots; "
        "print(HostSlots(2, sys.argv[1]).try_acquire('img.example.test') is None)"
    )
    out = subprocess.run([sys.executable, "-c", probe, d], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    mine.release(held.pop())
    out = subprocess.run([sys.executable, "-c", probe, d], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert mine.try_acquire("other.example.test") is not None  # other hosts are not affected
