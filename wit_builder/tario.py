"""The package's one tar codec: deterministic tars out, a fast header scan in.

Writing: `member` encodes one ustar member with fixed header fields (mtime 0, uid/gid 0, empty
user/group names, mode 0o644, regular file, utf-8 names), so the same members in the same order
give a byte-identical tar; `TarWriter` streams members to a temporary name next to the target
(local path or fsspec URL), hashes them as it goes, ends the archive the way `tarfile` does (two
zero blocks, padded to a 10240-byte record) and renames it into place on a clean exit.

Reading: `iter_members` parses the headers itself (ustar, pax `path`/`size` records, GNU long
names and base-256 sizes; both checksum forms verified), yielding each regular file's name, data
offset and size plus a `read()` for its data; data not read is seeked over. It costs ~5 us a
member where `tarfile` costs ~130. `read_tar` and `member_offsets` are built on it. Every format
problem (bad checksum, bad number, a cut in a header or in data) raises `TarFormatError`.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.tar")
    >>> size, sha = write_tar(p, [("k1.txt", b"hi"), ("k1.json", b"{}")])
    >>> size == os.path.getsize(p), len(sha)
    (True, 64)
    >>> list(read_tar(p))
    [('k1.txt', b'hi'), ('k1.json', b'{}')]
    >>> [(name, size) for name, _offset, size in member_offsets(p, lambda n: n.endswith(".json"))]
    [('k1.json', 2)]
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import BinaryIO, NamedTuple
from zlib import adler32

from wit_builder import io as wio

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: archives are padded to whole records, as tarfile does
_ZERO_BLOCK = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and its old and contiguous forms)
_EXTENDED = (b"x", b"L", b"K")  # pax header, GNU long name, GNU long link name: about the next header


class TarFormatError(ValueError):
    """A tar that cannot be parsed: bad header checksum or number field, or cut short."""


# ---------------------------------------------------------------- writing


def member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes) with fixed header fields.

    A name longer than 100 bytes is split into ustar prefix + name; one that cannot be split
    (a last component over 100 bytes, or over 255 bytes in all) raises ValueError.

    >>> m = member("k.txt", b"hi")
    >>> len(m), m[:5], m[512:514]
    (1024, b'k.txt', b'hi')
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % BLOCK)


class TarWriter:
    """Stream members into a tar atomically (temp name, renamed on a clean exit), hashing as it
    goes; `bytes` and `sha256` describe the finished file. On an exception the temporary file
    is removed and the target is left as it was.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "sub", "a.tar")
    >>> with TarWriter(p) as t:
    ...     t.add("k.txt", b"hello")
    >>> t.bytes == os.path.getsize(p) == 10240, [n for n, _ in read_tar(p)]
    (True, ['k.txt'])
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = wio.tmp_name(path)
        self.bytes = 0
        self._sha = hashlib.sha256()
        self._f: BinaryIO | None = None

    def __enter__(self) -> TarWriter:
        if "/" in self.path:
            wio.makedirs(self.path.rsplit("/", 1)[0])
        self._f = wio.open_file(self.tmp, "wb")
        return self

    def _write(self, b: bytes) -> None:
        if self._f is None:
            raise ValueError("TarWriter used outside its `with` block")
        self._f.write(b)
        self._sha.update(b)
        self.bytes += len(b)

    def add(self, name: str, data: bytes) -> None:
        """Append one member (see `member`)."""
        self._write(member(name, data))

    def __exit__(self, exc_type, *rest) -> None:
        f = self._f
        if f is None:
            raise ValueError("TarWriter exited without being entered")
        committed = False
        try:
            if exc_type is None:
                end = self.bytes + 2 * BLOCK
                self._write(b"\0" * (2 * BLOCK + (-end % RECORD)))  # end-of-archive, whole records
            f.close()
            if exc_type is None:
                wio.commit(self.tmp, self.path)
                committed = True
        finally:
            self._f = None
            if not committed:
                with contextlib.suppress(Exception):  # the error under way is the one to see
                    f.close()  # a second close is a no-op
                wio.discard(self.tmp)  # (on an object store, close has uploaded the partial file)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far (of the whole file after the `with` block)."""
        return self._sha.hexdigest()


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write (name, bytes) members in the given order to `path` atomically; returns
    (size in bytes, sha256 hex) of the file."""
    with TarWriter(path) as t:
        for name, data in members:
            t.add(name, data)
    return t.bytes, t.sha256


# ---------------------------------------------------------------- reading


class Member(NamedTuple):
    """A regular file of a tar: `offset` is where its data starts in the file. `read()` returns
    the data; call it before asking the iterator for the next member."""

    name: str
    offset: int
    size: int
    read: Callable[[], bytes]


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80) for big values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(field or b"0", 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _number_text(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarFormatError(f"bad pax size {value!r}") from None


def _unsigned_sum(header: bytes) -> int:
    """The header checksum (bytes summed, the checksum field counted as 8 spaces), at C speed:
    adler32's low half is 1 + (sum of bytes mod 65521), exact for 256 bytes (at most 65280), so
    two halves give the block's sum ~5x faster than sum() over its 512 bytes.

    >>> h = bytes(range(256)) * 2
    >>> _unsigned_sum(h) == sum(h[:148]) + 8 * 32 + sum(h[156:])
    True
    """
    block_sum = (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - 2
    return block_sum - sum(header[148:156]) + 8 * 32


def _signed_sum(header: bytes) -> int:
    """The checksum some old tar writers compute (bytes as signed chars)."""
    return sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("bad pax extended header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def iter_members(f: BinaryIO) -> Generator[Member, None, bool]:
    """The regular files of an uncompressed tar read from seekable `f`, in order (directories,
    links and other entries are skipped). Names come from a pax `path` record, a GNU long-name
    entry or the ustar prefix + name; sizes from a pax `size` record or the header (octal or GNU
    base-256). Only headers are read: data not `read()` is seeked over.

    Raises TarFormatError on a bad header or a cut inside a header or a read member. The
    generator's return value (StopIteration.value) is True after an end-of-archive marker,
    False when the file just stops at a member boundary.

    >>> import io
    >>> tar = member("a.txt", b"hello") + member("b.txt", b"!") + bytes(1024)
    >>> it = iter_members(io.BytesIO(tar))
    >>> m = next(it); m.name, m.offset, m.size, m.read()
    ('a.txt', 512, 5, b'hello')
    >>> next(it).name
    'b.txt'
    >>> next(it)
    Traceback (most recent call last):
    StopIteration: True
    """
    long_name: str | None = None
    pax_size: int | None = None
    read_block, seek = f.read, f.seek
    pos = f.tell()
    while True:
        header = read_block(BLOCK)
        if len(header) < BLOCK:
            if header:
                raise TarFormatError("cut inside a header")
            return False  # EOF without an end-of-archive marker
        if header == _ZERO_BLOCK:
            return True
        pos += BLOCK
        try:  # the common case inline (octal digits, NUL/space-terminated); _number does the rest
            chksum = int(header[148:156].rstrip(b"\0 "), 8)
            size = int(header[124:136].rstrip(b"\0 "), 8)
        except ValueError:
            chksum, size = _number(header[148:156]), _number(header[124:136])
        if chksum != _unsigned_sum(header) and chksum != _signed_sum(header):
            raise TarFormatError("header checksum mismatch")
        kind = header[156:157]
        padded = (size + 511) & ~511
        if kind in _EXTENDED:
            data = read_block(padded)[:size]
            if len(data) < size:
                raise TarFormatError("cut inside an extended header")
            pos += padded
            if kind == b"x":
                records = _pax_records(data)
                if b"path" in records:
                    long_name = _text(records[b"path"])
                if b"size" in records:
                    pax_size = _number_text(records[b"size"])
            elif kind == b"L":
                long_name = _text(data.rstrip(b"\0"))
            continue
        if pax_size is not None:
            size, pax_size = pax_size, None
            padded = (size + 511) & ~511
        name, long_name = long_name, None
        if name is None:
            name = _text(header[:100].partition(b"\0")[0])
            if header[345] and header[257:263] == b"ustar\0":  # POSIX ustar prefix (GNU has none)
                name = _text(header[345:500].partition(b"\0")[0]) + "/" + name
        start, pos = pos, pos + padded
        if kind in _FILE_TYPES:

            def read(size: int = size) -> bytes:
                data = read_block(size)
                if len(data) < size:
                    raise TarFormatError("member data truncated")
                return data

            yield Member(name, start, size, read)
        seek(pos)  # past the data and its padding, read or not


def read_tar(path: str, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of the tar at `path` (local or fsspec URL), in file
    order; with `want`, only of the names it accepts (the others' data is seeked over). A file
    that stops at a member boundary without an end-of-archive marker ends the iteration, as it
    does in `tarfile`; anything else malformed raises TarFormatError."""
    with wio.open_file(path, "rb") as f:
        for m in iter_members(f):
            if want is None or want(m.name):
                yield m.name, m.read()


def member_offsets(path: str, want: Callable[[str], bool]) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of `path` whose name `want` accepts, in file
    order, from the headers alone: `f.seek(offset); f.read(size)` returns the member's data."""
    with wio.open_file(path, "rb") as f:
        for m in iter_members(f):
            if want(m.name):
                yield m.name, m.offset, m.size
