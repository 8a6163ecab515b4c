"""Stored images carry no metadata: a JPEG with GPS EXIF, XMP, an ICC profile and a comment is
downloaded, resized or not, and stored with none of it; `keep_metadata` keeps it on request."""

from __future__ import annotations

import io as _io
import os

import pytest
from PIL import Image

from test_download import make_selection
from wit_builder import io
from wit_builder.resize import ImageResizer, ResizeSettings, inspect, metadata_markers, prepare
from wit_builder.stages import download
from wit_builder.tario import read_tar

GPS = {1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 1.0)}
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>Jane Doe</dc:creator>'
    b"</rdf:Description></rdf:RDF></x:xmpmeta>"
)
EVERYTHING = ["APP1:Exif", "APP1:XMP", "APP2:ICC", "COM"]


def gps_jpeg(size: tuple[int, int], orientation: int = 1) -> bytes:
    """A JPEG with GPS EXIF (+ camera make, orientation), XMP, an ICC profile and a comment."""
    im = Image.new("RGB", size, (120, 60, 30))
    im.paste((20, 200, 90), (0, 0, size[0] // 2, size[1] // 3))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = orientation
    exif[0x8825] = GPS
    buf = _io.BytesIO()
    im.save(buf, "JPEG", exif=exif, xmp=XMP, comment=b"taken at home", icc_profile=b"\0" * 300)
    return buf.getvalue()


def _resize(data: bytes, **kw) -> bytes:
    keep = kw.pop("keep_metadata", False)
    resizer = ImageResizer(ResizeSettings(image_size=64, **kw), keep_metadata=keep)
    return resizer(prepare(data, inspect(data, 10**8)), data).data


def _gps(data: bytes) -> dict:
    with Image.open(_io.BytesIO(data)) as im:
        return dict(im.getexif().get_ifd(0x8825))


def test_the_source_really_carries_metadata():
    src = gps_jpeg((160, 120))
    assert metadata_markers(src) == EVERYTHING
    assert _gps(src)[1] == "N"


@pytest.mark.parametrize(
    "size, orientation, fmt",
    [
        ((160, 120), 1, "jpg"),  # resized (smaller side 120 > 64)
        ((60, 40), 1, "jpg"),  # not resized: smaller than image_size, re-encoded all the same
        ((160, 120), 6, "jpg"),  # EXIF rotation: normalised by PIL first
        ((160, 120), 1, "png"),
        ((160, 120), 1, "webp"),
    ],
)
def test_stored_image_has_no_metadata(size, orientation, fmt):
    out = _resize(gps_jpeg(size, orientation), encode_format=fmt, encode_quality=3 if fmt == "png" else 90)
    assert metadata_markers(out) == []
    with Image.open(_io.BytesIO(out)) as im:
        assert len(im.getexif()) == 0
        assert not {"xmp", "icc_profile", "comment", "exif"} & set(im.info)


def test_keep_metadata_copies_it_into_the_jpeg():
    out = _resize(gps_jpeg((160, 120), orientation=6), keep_metadata=True)
    assert metadata_markers(out) == EVERYTHING
    assert _gps(out) == GPS
    with Image.open(_io.BytesIO(out)) as im:
        assert im.size == (64, 85)  # rotated upright by us ...
        assert im.getexif()[0x0112] == 1  # ... so viewers must not rotate again
        assert b"Jane Doe" in im.info["xmp"] and im.info["comment"] == b"taken at home"


def test_keep_metadata_needs_jpg():
    with pytest.raises(ValueError, match="keep_metadata"):
        download.Config(keep_metadata=True, encode_format="png", encode_quality=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [False, True])
def test_download_stores_no_metadata(static_server, tmp_path, keep):
    base_url, root = static_server
    names = ["gps-big.jpg", "gps-small.jpg"]
    for name, size in zip(names, [(320, 240), (50, 40)]):
        with open(os.path.join(root, name), "wb") as f:
            f.write(gps_jpeg(size))
    run_dir = str(tmp_path)
    make_selection(run_dir, [f"{base_url}/{n}" for n in names], parts=1)
    cfg = download.Config(
        shard_size=10, threads_per_task=2, image_size=64, allow_private_network=True, keep_metadata=keep
    )
    (spec,) = download.plan_shards(download.selected_parts(io.join(run_dir, "selected")), 10)
    counts = download.download_shard(spec, cfg, io.join(run_dir, "download"))
    assert counts["successes"] == 2
    images = [d for n, d in read_tar(download.tar_path(io.join(run_dir, "download"), spec.name)) if n.endswith(".jpg")]
    assert len(images) == 2
    for data in images:
        if keep:
            assert metadata_markers(data) == EVERYTHING and _gps(data) == GPS
        else:
            assert metadata_markers(data) == [] and b"Jane Doe" not in data and b"CameraMaker" not in data
