"""Deterministic tar files: same members in, byte-identical tar out.

Members are written in the order given (callers pass them in key order) with fixed headers:
mtime 0, uid/gid 0, empty user/group names, mode 0o644, ustar format. The file is streamed to
a temporary name next to the target and renamed when complete (local paths and fsspec URLs).

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> n = write_tar(os.path.join(d, "a.tar"), [("k1.txt", b"hi"), ("k1.json", b"{}")])
    >>> n == os.path.getsize(os.path.join(d, "a.tar"))
    True
    >>> [name for name, _ in read_tar(os.path.join(d, "a.tar"))]
    ['k1.txt', 'k1.json']
"""

from __future__ import annotations

import io
import tarfile
from typing import Iterable, Iterator

import fsspec

from wit_builder import io as wio


def tar_header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write `members` (name, bytes) in the given order to `path` atomically; returns its size."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        wio.makedirs(parent)
    tmp = wio._tmp_name(path)
    with fsspec.open(tmp, "wb") as raw:
        counter = _CountingWriter(raw)
        with tarfile.open(fileobj=counter, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                tar.addfile(tar_header(name, len(data)), io.BytesIO(data))
    wio._commit(tmp, path)
    return counter.n


def read_tar(path: str) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) of the regular members of `path`, in file order."""
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, tar.extractfile(m).read()


class _CountingWriter:
    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()
