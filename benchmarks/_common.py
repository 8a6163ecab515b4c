"""Small helpers shared by the benchmark scripts: process-tree memory sampling, a loopback nginx.

Process trees are read from /proc (Linux), so no extra dependency is needed: a sampler thread
polls the RSS of a root process and all its descendants (Ray's GCS, raylet and workers
included when Ray runs embedded in the root) and keeps, per process, its peak RSS.

Example:
    >>> import os
    >>> with TreeSampler(os.getpid(), interval=0.01) as s:
    ...     _ = bytearray(10_000_000)
    >>> s.peak_total >= 10_000_000
    True
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PAGE = os.sysconf("SC_PAGE_SIZE")

# the real data next to the repo (../shared/data; see each SOURCE.md)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
# real captions: (parquet file, caption column)
CAPTIONS = [
    (os.path.join(DATA, "captions", "laion_10k.parquet"), "TEXT"),
    (os.path.join(DATA, "captions", "coco_val2017_captions.parquet"), "caption"),
]


def load_captions() -> list[str]:
    """Every real caption of CAPTIONS, in file order."""
    import pyarrow.parquet as pq

    out: list[str] = []
    for path, col in CAPTIONS:
        out += pq.read_table(path, columns=[col]).column(col).to_pylist()
    return out


def _snapshot() -> tuple[dict[int, list[int]], dict[int, tuple[int, int]]]:
    """(parent -> children, pid -> (rss bytes, cpu ticks user+system)) of every process."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(name)
        children.setdefault(int(parts[1]), []).append(pid)
        info[pid] = (int(parts[21]) * PAGE, int(parts[11]) + int(parts[12]))
    return children, info


def process_tree(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (rss bytes, cpu ticks) of `root` and all its descendants."""
    children, info = _snapshot()
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in info:
            out[pid] = info[pid]
        stack.extend(children.get(pid, []))
    return out


def process_name(pid: int) -> str:
    """A short label: Ray's worker title (`ray::IDLE`, `ray::match_part`) or the program name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    prog = os.path.basename(argv[0])
    if prog.startswith("python") and len(argv) > 1:
        return f"{prog} {os.path.basename(argv[1])}"
    return prog


@dataclass
class TreeSampler:
    """Poll a process tree's RSS in a thread; peak per process and peak of the sum."""

    root: int
    interval: float = 0.1
    peak_total: int = 0
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    ticks_start: dict[int, int] = field(default_factory=dict)  # CPU ticks when first seen
    ticks_last: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        tree = process_tree(self.root)
        self.peak_total = max(self.peak_total, sum(rss for rss, _ in tree.values()))
        first = not self.ticks_start
        for pid, (rss, ticks) in tree.items():
            self.ticks_start.setdefault(pid, ticks if first else 0)
            self.ticks_last[pid] = max(ticks, self.ticks_last.get(pid, 0))
            if rss > self.peak_by_pid.get(pid, -1):
                self.peak_by_pid[pid] = rss
                self.names[pid] = process_name(pid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def cpu_seconds(self) -> float:
        """CPU time (user + system) the tree spent while sampled (a process that ended between
        two samples loses its last interval)."""
        ticks = sum(last - self.ticks_start.get(pid, 0) for pid, last in self.ticks_last.items())
        return ticks / os.sysconf("SC_CLK_TCK")

    def peak_by_kind(self) -> dict[str, int]:
        """Largest peak RSS among the processes of each label."""
        out: dict[str, int] = {}
        for pid, rss in self.peak_by_pid.items():
            name = self.names.get(pid, "?")
            out[name] = max(out.get(name, 0), rss)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(tmp: str, server_block: str, port: int, http_extra: str = "") -> subprocess.Popen:
    """Start nginx (Debian `nginx-light`) in the foreground with its config in `tmp`, one
    worker, listening on 127.0.0.1:`port`; `server_block` is the body of its `server {}`,
    `http_extra` more `http {}` directives (e.g. a `log_format`; access logs are off unless the
    server block turns one on).
    Stop it with .terminate() (by its PID)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        sys.exit("nginx not found: apt-get install -y nginx-light")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 4096; }}
http {{
  sendfile on;
  access_log off;
  {http_extra}
  keepalive_timeout 30;
  types {{ image/jpeg jpg; text/html html; }}
  default_type application/octet-stream;
  client_body_temp_path {tmp}/body;
  server {{ listen 127.0.0.1:{port}; {server_block} }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", tmp, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"nginx failed: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    proc.terminate()
    sys.exit("nginx did not start")
