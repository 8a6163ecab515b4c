"""The run directory's lease: one run (or stage, or `download --retry-failed`) at a time per --out.

`RUN_DIR/_LOCK.json` names its holder:

    {"host": "node-3", "boot_id": "…", "pid": 4242, "token": "9f…", "command": "wit-build run …",
     "started_at": "2026-01-02T10:00:00.000+00:00",
     "heartbeat_at": "2026-01-02T10:41:20.512+00:00"}

A daemon thread rewrites `heartbeat_at` every `WIT_LEASE_HEARTBEAT_S` seconds (10) while the
lease is held; the lease is removed when the run ends, normally or not. Another run finding the
file refuses to start (ConfigError: exit code 2, naming the holder), unless the lease is
abandoned: its heartbeat is older than `WIT_LEASE_STALE_S` seconds (60), or its holder ran on
this host (same hostname and boot id) and its pid is gone. Then it takes the lease over and
says so on stderr.

No flock: the run directory may be an object store reached through fsspec, so taking the lease
is write, wait `WIT_LEASE_SETTLE_S` (0.2 s local, 2 s elsewhere), read back and compare the
token; of two runs racing for the same directory, the one whose write landed last keeps it and
the other one stops. What this leaves open: a run that stalls for longer than the settle time
between seeing no lease and writing its own (on an object store: a slow PUT) can overwrite a
lease another run has just verified, and then both run; a heartbeat whose read and rewrite
straddle a takeover can do the same. Closing that needs conditional writes (If-None-Match /
generation preconditions), which fsspec does not offer across stores. Staleness compares the
lease's timestamps with this host's clock, so hosts sharing a run directory need synchronised
clocks (NTP).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunLease(d, settle_s=0):
    ...     holder(d)["pid"] == os.getpid()
    True
    >>> holder(d) is None
    True
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from wit_builder import io
from wit_builder.config import ConfigError

LOCK = "_LOCK.json"
HEARTBEAT_ENV = "WIT_LEASE_HEARTBEAT_S"
STALE_ENV = "WIT_LEASE_STALE_S"
SETTLE_ENV = "WIT_LEASE_SETTLE_S"


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{name}={text!r}: expected a number of seconds >= 0")
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _age_s(stamp: Any) -> float | None:
    """Seconds since an ISO timestamp of the lease; None when it does not parse."""
    try:
        then = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def lock_path(run_dir: str) -> str:
    return io.join(run_dir, LOCK)


def holder(run_dir: str) -> dict[str, Any] | None:
    """The lease in `run_dir` as written (None when there is none); an unreadable lease file
    reads as {} (it is taken over)."""
    path = lock_path(run_dir)
    try:
        data = io.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {} if io.exists(path) else None
    return data if isinstance(data, dict) else {}


def describe(lease: dict[str, Any]) -> str:
    """'pid 4242 on node-3 (`wit-build run …`), since 2026-…, last heartbeat 3 s ago'."""
    age = _age_s(lease.get("heartbeat_at"))
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    command = f" (`{lease['command']}`)" if lease.get("command") else ""
    return f"pid {lease.get('pid')} on {lease.get('host')}{command}, since {lease.get('started_at')}{beat}"


def abandoned(lease: dict[str, Any], stale_s: float) -> str | None:
    """Why a lease may be taken over (its holder is gone), or None while it is held."""
    if not lease or "token" not in lease:
        return "the lease file is unreadable"
    age = _age_s(lease.get("heartbeat_at"))
    if age is None:
        return "the lease has no readable heartbeat"
    same_host = lease.get("host") == socket.gethostname() and lease.get("boot_id", "") == _boot_id()
    pid = lease.get("pid")
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} is no longer running on this host"
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (stale after {stale_s:g} s)"
    return None


class RunLease:
    """Hold `RUN_DIR/_LOCK.json` for the duration of a `with` block (or acquire()/release())."""

    def __init__(
        self,
        run_dir: str,
        *,
        command: str | None = None,
        heartbeat_s: float | None = None,
        stale_s: float | None = None,
        settle_s: float | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.command = command if command is not None else _command_line()
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else _env_seconds(HEARTBEAT_ENV, 10.0)
        self.stale_s = stale_s if stale_s is not None else _env_seconds(STALE_ENV, 60.0)
        default_settle = 0.2 if io.is_local(run_dir) else 2.0
        self.settle_s = settle_s if settle_s is not None else _env_seconds(SETTLE_ENV, default_settle)
        if self.heartbeat_s <= 0 or self.heartbeat_s >= self.stale_s:
            raise ConfigError(
                f"lease: the heartbeat ({HEARTBEAT_ENV}={self.heartbeat_s:g}) must be > 0 and shorter "
                f"than the stale timeout ({STALE_ENV}={self.stale_s:g})"
            )
        self.token = secrets.token_hex(16)
        self.lost_to: dict[str, Any] | None = None
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------
    def acquire(self) -> RunLease:
        current = holder(self.run_dir)
        if current is not None:
            reason = abandoned(current, self.stale_s)
            if reason is None:
                raise ConfigError(self._refusal(current))
            _say(f"wit-build: taking over the lease of {self.run_dir} from {describe(current)}: {reason}")
        stamp = _now()
        self._record = {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "token": self.token,
            "command": self.command,
            "started_at": stamp,
            "heartbeat_at": stamp,
        }
        try:
            io.write_json(self._record, self.path)
            time.sleep(self.settle_s)  # a racing run's write lands in this window; the last one wins
            after = holder(self.run_dir)
            if not after or after.get("token") != self.token:
                raise ConfigError(self._refusal(after or {}, raced=True))
        except BaseException:
            self._remove_if_mine()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="wit-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another run has taken it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.settle_s + 5.0))
            self._thread = None
        self._remove_if_mine()

    def check(self) -> None:
        """Raise ConfigError when another run took the lease over (this run stalled past the
        stale timeout); the runner calls this before each stage."""
        if self.lost_to is not None:
            raise ConfigError(
                f"lost the lease of {self.run_dir} to {describe(self.lost_to)} (this run's heartbeat "
                f"went stale); stopping so two runs do not write the same directory"
            )

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = holder(self.run_dir)
                if current is not None and current.get("token") not in (None, self.token):
                    self.lost_to = current
                    _say(f"wit-build: warning: {describe(current)} took over the lease of {self.run_dir}")
                    return
                if self._stop.is_set():
                    return
                self._record["heartbeat_at"] = _now()
                io.write_json(self._record, self.path)
            except Exception as e:  # a failed renewal is retried at the next beat
                _say(f"wit-build: warning: could not renew the lease {self.path}: {type(e).__name__}: {e}")

    def _remove_if_mine(self) -> None:
        try:
            current = holder(self.run_dir)
            if current is not None and current.get("token") == self.token:
                io.remove(self.path)
        except Exception as e:
            _say(f"wit-build: warning: could not remove the lease {self.path}: {type(e).__name__}: {e}")

    def _refusal(self, current: dict[str, Any], raced: bool = False) -> str:
        what = "another run took it first" if raced else "it is in use"
        return (
            f"{self.run_dir}: {what}: {describe(current)}. Wait for that run to finish or stop it; "
            f"a lease left by a killed run is taken over once its holder is gone or its heartbeat "
            f"is older than {self.stale_s:g} s ({self.path})"
        )


def _command_line() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"] + sys.argv[1:]
    return " ".join(argv)[:300]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
