"""wit_builder.tario, the one tar codec: what it writes is what tarfile writes (byte for byte),
what tarfile writes it reads (ustar, pax, GNU), and every damaged archive is reported."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import fsspec
import pytest

from wit_builder import tario

MEMBERS = [
    ("0a1b2c3d4e5f6a7b.jpg", b"\xff\xd8" + bytes(range(256)) * 5),
    ("0a1b2c3d4e5f6a7b.json", b'{"uid": "0a1b2c3d4e5f6a7b"}'),
    ("0a1b2c3d4e5f6a7b.txt", "a café in Zürich".encode()),
    ("empty.txt", b""),
    ("exact.bin", b"x" * 512),
    ("one-over.bin", b"y" * 513),
    ("d" * 120 + "/long.txt", b"split into ustar prefix + name"),
    ("ünïcode/名前.txt", b"utf-8 names"),
]


def _tarfile_bytes(members) -> bytes:
    """The same members through the standard library, with the same fixed header fields."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("n", [0, 1, 3, len(MEMBERS)])
def test_writer_output_is_byte_identical_to_tarfile(tmp_path, n):
    path = str(tmp_path / "a.tar")
    size, sha = tario.write_tar(path, MEMBERS[:n])
    data = open(path, "rb").read()
    assert data == _tarfile_bytes(MEMBERS[:n])
    assert size == len(data) and len(data) % tario.RECORD == 0
    assert sha == hashlib.sha256(data).hexdigest()


def test_record_padding_at_the_record_boundary(tmp_path):
    """Members filling a record up to the end-of-archive blocks exactly: no extra record."""
    members = [("a.bin", b"z" * (tario.RECORD - 3 * tario.BLOCK))]  # header + 17 data + 2 end = 20 blocks
    path = str(tmp_path / "a.tar")
    size, _ = tario.write_tar(path, members)
    assert size == tario.RECORD and open(path, "rb").read() == _tarfile_bytes(members)


def test_member_matches_tarfile_header_and_rejects_unsplittable_names():
    for name, data in MEMBERS:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + bytes(-len(data) % 512)
        assert tario.member(name, data) == expected
    with pytest.raises(ValueError):
        tario.member("x" * 101, b"")  # no "/" to split at


def test_writes_are_deterministic(tmp_path):
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    assert tario.write_tar(a, MEMBERS) == tario.write_tar(b, MEMBERS)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_writer_is_atomic_and_cleans_up_on_an_exception(tmp_path):
    path = str(tmp_path / "a.tar")
    tario.write_tar(path, MEMBERS[:1])
    before = open(path, "rb").read()
    with pytest.raises(RuntimeError):
        with tario.TarWriter(path) as t:
            t.add("k.txt", b"partial")
            assert set(os.listdir(tmp_path)) == {"a.tar", os.path.basename(t.tmp)}  # streams to a temp name
            raise RuntimeError("crash mid-tar")
    assert os.listdir(tmp_path) == ["a.tar"] and open(path, "rb").read() == before
    with pytest.raises(RuntimeError):
        with tario.TarWriter(str(tmp_path / "new.tar")):
            raise RuntimeError
    assert os.listdir(tmp_path) == ["a.tar"]


def test_fsspec_memory_paths():
    path = "memory://tario-test/sub/a.tar"
    size, sha = tario.write_tar(path, MEMBERS)
    fs = fsspec.filesystem("memory")
    assert fs.ls("/tario-test/sub", detail=False) == ["/tario-test/sub/a.tar"]  # no temp file left
    with fsspec.open(path, "rb") as f:
        data = f.read()
    assert data == _tarfile_bytes(MEMBERS) and size == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert list(tario.read_tar(path)) == MEMBERS
    assert [n for n, _, _ in tario.member_offsets(path, lambda n: n.endswith(".txt"))] == [
        n for n, _ in MEMBERS if n.endswith(".txt")
    ]
    fs.rm("/tario-test", recursive=True)


@pytest.mark.parametrize("fmt", ["ustar", "pax", "gnu"])
def test_reader_agrees_with_tarfile(tmp_path, fmt):
    """The header scan reads what the standard library writes: long names (pax records, GNU
    longname, ustar prefix), directories and links (skipped), empty files, sizes across block
    boundaries; data offsets are tarfile's; the end-of-archive marker is reported."""
    formats = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
    long_dir = "d" * 120 if fmt != "ustar" else "d" * 90
    files = {
        "a/s1.jpg": b"x" * 511,
        "a/s1.txt": b"",
        f"{long_dir}/s2.json": b"{}" * 300,
        "b/" + "n" * (150 if fmt != "ustar" else 80) + ".txt": b"caption",
        "c/\u00e9t\u00e9.txt": b"utf8",
    }
    path = str(tmp_path / "t.tar")
    with tarfile.open(path, "w", format=formats[fmt], encoding="utf-8") as tf:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("a/link")
        link.type, link.linkname = tarfile.SYMTYPE, "l" * (120 if fmt != "ustar" else 50)
        tf.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        offsets = {m.name: m.offset_data for m in tf if m.isfile()}
    with open(path, "rb") as f:
        members = tario.iter_members(f)
        got = {}
        try:
            while True:
                m = next(members)
                assert m.offset == offsets[m.name]
                got[m.name] = m.read() if not m.name.endswith(".json") else m.size  # one left unread
        except StopIteration as stop:
            assert stop.value is True, "the end-of-archive marker is seen"
    assert got == {n: (d if not n.endswith(".json") else len(d)) for n, d in files.items()}
    assert dict(tario.read_tar(path)) == files


def test_member_offsets_point_at_the_data(tmp_path):
    path = str(tmp_path / "a.tar")
    tario.write_tar(path, MEMBERS)
    found = list(tario.member_offsets(path, lambda n: not n.endswith(".json")))
    assert [n for n, _, _ in found] == [n for n, _ in MEMBERS if not n.endswith(".json")]
    with open(path, "rb") as f:
        for name, offset, size in found:
            f.seek(offset)
            assert f.read(size) == dict(MEMBERS)[name]
    assert list(tario.read_tar(path, want=lambda n: n.endswith(".txt"))) == [
        (n, d) for n, d in MEMBERS if n.endswith(".txt")
    ]


def _damaged(tmp_path, edit) -> str:
    path = tmp_path / "t.tar"
    data = bytearray(tario.member("a.txt", b"abc") + tario.member("b.txt", b"x" * 700) + bytes(1024))
    data = edit(data)
    path.write_bytes(bytes(data))
    return str(path)


def test_a_checksum_mismatch_is_reported(tmp_path):
    def flip(data):
        data[1024 + 10] ^= 0xFF  # the second header's name: checksum no longer matches
        return data

    path = _damaged(tmp_path, flip)
    with pytest.raises(tario.TarFormatError, match="checksum"):
        list(tario.read_tar(path))
    with open(path, "rb") as f:  # the members before the damage are read
        it = tario.iter_members(f)
        assert next(it).read() == b"abc"
        with pytest.raises(tario.TarFormatError, match="checksum"):
            next(it)


def test_a_signed_checksum_is_accepted(tmp_path):
    """Old writers summed the header as signed chars; names with bytes > 127 tell them apart."""
    header = bytearray(tario.member("é.txt", b"")[:512])
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    assert signed != int(header[148:154], 8)
    header[148:156] = b"%06o\0 " % signed
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(header) + bytes(1024))
    assert list(tario.read_tar(str(path))) == [("é.txt", b"")]


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])


def test_bad_numbers_are_reported(tmp_path):
    def bad_size(data):
        data[124:136] = b"12x4567\0\0\0\0\0"
        header = data[:512]
        _fix_checksum(header)
        data[:512] = header
        return data

    def bad_checksum_field(data):
        data[148:156] = b"zzzzzz\0 "
        return data

    for edit in (bad_size, bad_checksum_field):
        with pytest.raises(tario.TarFormatError, match="bad number field"):
            list(tario.read_tar(_damaged(tmp_path, edit)))


def test_truncated_archives(tmp_path):
    full = tario.member("a.txt", b"abc") + tario.member("b.txt", b"x" * 700) + bytes(1024)
    cases = {
        "inside a header": full[: 512 + 512 + 100],
        "inside data": full[: 512 + 512 + 512 + 200],
    }
    for what, data in cases.items():
        p = tmp_path / "t.tar"
        p.write_bytes(data)
        with pytest.raises(tario.TarFormatError, match="cut inside a header|truncated"):
            list(tario.read_tar(str(p)))
            pytest.fail(f"cut {what} not reported")
    # cut at a member boundary: no error, but the generator says there was no end marker
    with io.BytesIO(full[:1024]) as f:
        it = tario.iter_members(f)
        assert next(it).name == "a.txt"
        with pytest.raises(StopIteration) as stop:
            next(it)
        assert stop.value.value is False
    p = tmp_path / "t.tar"
    p.write_bytes(full[:1024])
    assert list(tario.read_tar(str(p))) == [("a.txt", b"abc")]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_sizes_past_8_gib_in_headers(fmt):
    """GNU base-256 size fields and pax `size` records (the data itself is not there)."""
    info = tarfile.TarInfo("big.bin")
    info.size = 2**34  # does not fit 11 octal digits; low bytes zero (not stripped as padding)
    f = io.BytesIO(info.tobuf(fmt, "utf-8", "strict"))
    it = tario.iter_members(f)
    m = next(it)
    assert (m.name, m.size) == ("big.bin", 2**34)
    with pytest.raises(tario.TarFormatError, match="truncated"):
        m.read()


def test_gnu_long_names_and_pax_records_are_read(tmp_path):
    """Hand-built extended headers: a GNU long name, and a pax header with several records."""
    long_name = "x" * 300 + ".txt"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        info = tarfile.TarInfo(long_name)
        info.size = 2
        info.mtime = 1.5  # pax: an mtime record next to the path record
        buf = info.tobuf(fmt, "utf-8", "strict") + b"hi" + bytes(510) + bytes(1024)
        assert [(m.name, m.size, m.read()) for m in tario.iter_members(io.BytesIO(buf))] == [(long_name, 2, b"hi")]


def test_gnu_headers_have_no_ustar_prefix():
    """Bytes 345.. of a GNU header are atime/ctime, not a name prefix."""
    info = tarfile.TarInfo("k.txt")
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"))
    assert header[257:265] == b"ustar  \0"
    header[345:357] = b"%011o\0" % 1_700_000_000  # an atime
    _fix_checksum(header)
    assert [m.name for m in tario.iter_members(io.BytesIO(bytes(header) + bytes(1024)))] == ["k.txt"]


def test_the_fast_checksum_is_the_byte_sum():
    blocks = [bytes(512), b"\xff" * 512, bytes(range(256)) * 2] + [os.urandom(512) for _ in range(2000)]
    for h in blocks:
        assert tario._unsigned_sum(h) == sum(h[:148]) + 8 * ord(" ") + sum(h[156:])
