"""A multi-node Ray cluster on 127.0.0.1 for tests: one `ray start --head --block` process and
worker nodes, each `ray start --address ... --block`, as separate processes.

Each node has its own temp dir (short: Ray's socket paths must fit in 107 bytes), its own free
ports and worker-port range, one CPU and a custom resource `on_<name>` = 1 so a task can be
pinned to it. Token authentication is on, as Ray 2.60's `ray start --head` turns it on whenever
the head machine has a token: every node gets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (its own,
random); a client needs the same two (`client_env()`). A node is stopped by its
`ray start --block` process's PID: SIGTERM makes that process stop the node's daemons (raylet,
GCS, agents). `kill(name)` SIGKILLs the node's whole process tree instead (its workers run in
sessions of their own, so not a process group), as a crashed machine would be. Nothing here
calls `ray stop` (it stops every Ray on the host) or touches Ray's default temp dir.

Example (takes ~20 s):
    >>> with LocalRayCluster(workers=1) as c:          # doctest: +SKIP
    ...     c.address
    '127.0.0.1:41234'
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
READY = "Ray runtime started."
# A killed node is declared dead after ~4 s (Ray's default: 5 missed checks 3 s apart), late
# enough that a node merely slowed down by a busy 2-core machine is not.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(width: int, taken: set[int]) -> int:
    """The first port of `width` consecutive free ports in 20000-29999 (below Linux's ephemeral
    range), none in `taken`: a node's workers bind there."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - width)
        ports = range(base, base + width)
        if taken.isdisjoint(ports) and all(_is_free(p) for p in ports):
            taken.update(ports)
            return base
    raise RuntimeError("no free worker-port range")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Node:
    """One node: its `ray start --block` process (which started the node's daemons; they start
    its workers, each in a session of its own, so a node is a process tree, not a group)."""

    def __init__(self, name: str, proc: subprocess.Popen, temp_dir: str, log: str):
        self.name, self.proc, self.temp_dir, self.log = name, proc, temp_dir, log

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """The live processes of this node: its `ray start` and everything it started."""
        return _tree(self.proc.pid)

    def titles(self) -> list[str]:
        """The command lines of this node's processes (a Ray worker's is `ray::TASK_NAME`)."""
        return [t for t in (_cmdline(pid) for pid in self.pids()) if t]

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _tree(root: int) -> list[int]:
    """`root` and its live descendants (zombies left out)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(entry))
    st = _stat(root)
    found, todo = ([root] if st is not None and st[0] != "Z" else []), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_tree(root: int) -> None:
    """SIGKILL a process tree by its PIDs: stopped first (no new children), then killed."""
    _signal_all(_tree(root), signal.SIGSTOP)
    _signal_all(_tree(root), signal.SIGKILL)


class LocalRayCluster:
    """A head and `workers` worker nodes on 127.0.0.1 (see the module docstring)."""

    def __init__(self, workers: int = 2, root: str | None = None, object_store_mb: int = 80):
        self.root = root or tempfile.mkdtemp(prefix="wrc", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.object_store_mb = object_store_mb
        self.nodes: dict[str, Node] = {}
        self._worker_ports: set[int] = set()
        self._initial_workers = workers
        self._serial = 0

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which a Ray client reaches this cluster: token auth and the token."""
        return {**(os.environ if base is None else base), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self) -> None:
        starting = [self._spawn("head", head=True)]
        self._wait_ready(starting[0], 90)
        starting = [self._spawn(f"w{i + 1}") for i in range(self._initial_workers)]
        for node in starting:
            self._wait_ready(node, 90)
        self.wait_nodes(len(self.nodes))

    def add_node(self, name: str | None = None) -> Node:
        """Start one more worker node (e.g. after a kill) and wait until the cluster sees it."""
        self._serial += 1
        node = self._spawn(name or f"w{len(self.nodes)}x{self._serial}")
        self._wait_ready(node, 90)
        self.wait_nodes(sum(n.alive for n in self.nodes.values()))
        return node

    def _spawn(self, name: str, head: bool = False) -> Node:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        base = _free_range(40, self._worker_ports)
        args = [
            RAY, "start", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1",
            "--resources", json.dumps({f"on_{name}": 1}),
            "--temp-dir", temp_dir,
            "--object-store-memory", str(self.object_store_mb * 2**20),
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--min-worker-port", str(base),
            "--max-worker-port", str(base + 39),
            "--include-log-monitor", "false",
        ]  # fmt: skip
        if head:
            args += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false"]
            args += ["--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        log = os.path.join(self.root, f"{name}.log")
        env = {**self.client_env(), **FAST_FAILURE_DETECTION}
        env.pop("RAY_ADDRESS", None)
        with open(log, "w") as f:
            proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, temp_dir, log)
        self.nodes[name] = node
        return node

    def _wait_ready(self, node: Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in node.log_text():
                return
            if not node.alive:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray node {node.name} did not start:\n{node.log_text()[-3000:]}")

    def wait_nodes(self, n: int, timeout: float = 60) -> None:
        """Wait until the cluster's GCS lists `n` live nodes (asked from a client process)."""
        code = (
            "import ray, sys, time\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout}\n"
            f"while sum(x['Alive'] for x in ray.nodes()) != {n} and time.monotonic() < deadline:\n"
            "    time.sleep(0.3)\n"
            "print(sum(x['Alive'] for x in ray.nodes()))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.client_env(), capture_output=True, text=True, timeout=timeout + 60
        )
        if out.stdout.strip() != str(n):
            raise RuntimeError(
                f"cluster has {out.stdout.strip() or '?'} live nodes, expected {n}: {out.stderr[-2000:]}"
            )

    def live_workers(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.name != "head" and n.alive]

    def ensure_workers(self, n: int) -> None:
        """Start worker nodes until `n` are alive (a test that killed one leaves fewer)."""
        while len(self.live_workers()) < n:
            self.add_node()

    def job_count(self) -> int:
        """How many jobs (drivers) have ever connected to the cluster, from its GCS."""
        code = (
            "import sys\n"
            "from ray._raylet import GcsClient\n"
            "print(len(GcsClient(address=sys.argv[1]).get_all_job_info()))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.address],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the cluster's jobs: {out.stderr[-2000:]}")
        return int(out.stdout.strip())

    def kill(self, name: str) -> None:
        """SIGKILL every process of node `name` (its `ray start`, raylet, agents and workers)."""
        node = self.nodes[name]
        pids = node.pids()
        _kill_tree(node.proc.pid)
        node.proc.wait(timeout=30)
        _wait_gone(pids, 30)

    def stop(self) -> None:
        """Stop every node by its PID (workers first, the head last), then remove the temp dirs."""
        for node in sorted(self.nodes.values(), key=lambda n: n.name == "head"):
            pids = node.pids()
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
                try:
                    node.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            _kill_tree(node.proc.pid)  # whatever ignored SIGTERM
            _signal_all([p for p in pids if _running(p)], signal.SIGKILL)  # workers its raylet left
            node.proc.wait(timeout=30)
            _wait_gone(pids, 30)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"
