"""Every stored image is 3-channel RGB, whatever the source's mode (issue 10), and RGB sources are
stored exactly as img2dataset's resizer alone stores them."""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
import PIL
import pytest
from PIL import Image

from hostile_server import photo
from wit_builder.resize import ImageResizer, ResizeSettings, inspect, prepare

pytestmark = pytest.mark.timeout(60)

SIZE = (48, 36)
GREY = 77  # an 8-bit grey level
GREY16 = 0x8000  # a 16-bit grey level: 128 in 8 bits, not 255


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _grey16(mode: str, value: int = GREY16) -> Image.Image:
    arr = np.full(SIZE[::-1], value, np.uint16)
    if mode == "I;16B":
        return Image.frombytes("I;16B", SIZE, arr.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(arr.astype(np.int32))
    return Image.fromarray(arr)


def _palette(mode: str) -> Image.Image:
    return Image.new("RGB", SIZE, (200, 30, 30)).convert(mode)


# name -> (encoded source, modes PIL may open it as, the RGB it must come out as)
SOURCES: dict[str, tuple[bytes, tuple[str, ...], tuple[int, int, int]]] = {
    "L.jpg": (_save(Image.new("L", SIZE, GREY), "JPEG", quality=95), ("L",), (GREY,) * 3),
    "L.png": (_save(Image.new("L", SIZE, GREY), "PNG"), ("L",), (GREY,) * 3),
    "1.png": (_save(Image.new("1", SIZE, 1), "PNG"), ("1",), (255,) * 3),
    "1.tif": (_save(Image.new("1", SIZE, 1), "TIFF"), ("1",), (255,) * 3),
    "1.bmp": (_save(Image.new("1", SIZE, 1), "BMP"), ("1",), (255,) * 3),
    "I;16.png": (_save(_grey16("I;16"), "PNG"), ("I;16", "I"), (128,) * 3),
    "I;16.tif": (_save(_grey16("I;16"), "TIFF"), ("I;16",), (128,) * 3),
    "I;16B.tif": (_save(_grey16("I;16B"), "TIFF"), ("I;16B", "I;16"), (128,) * 3),
    "I.tif": (_save(_grey16("I"), "TIFF"), ("I",), (128,) * 3),
    "LA.png": (_save(Image.new("LA", SIZE, (GREY, 255)), "PNG"), ("LA",), (GREY,) * 3),
    "P.png": (_save(_palette("P"), "PNG"), ("P",), (200, 30, 30)),
    "P.gif": (_save(_palette("P"), "GIF"), ("P",), (200, 30, 30)),
    "PA.tif": (_save(_palette("PA"), "TIFF"), ("PA",), (200, 30, 30)),
    "CMYK.jpg": (_save(_palette("CMYK"), "JPEG", quality=95), ("CMYK",), (200, 30, 30)),
    "CMYK.tif": (_save(_palette("CMYK"), "TIFF"), ("CMYK",), (200, 30, 30)),
}
FORMATS = ["jpg", "png", "webp"]


def _store(data: bytes, encode_format: str, image_size: int = 32) -> bytes:
    """What the download stage stores for `data`: inspect, prepare, resize and encode."""
    quality = 6 if encode_format == "png" else 95
    resizer = ImageResizer(ResizeSettings(image_size=image_size, encode_format=encode_format, encode_quality=quality))
    return resizer(prepare(data, inspect(data, max_pixels=10_000_000))).data


@pytest.mark.parametrize("encode_format", FORMATS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_mode_is_stored_as_rgb(name, encode_format):
    data, modes, rgb = SOURCES[name]
    assert Image.open(io.BytesIO(data)).mode in modes  # the test covers the mode it names
    stored = _store(data, encode_format)
    im = Image.open(io.BytesIO(stored))
    assert im.mode == "RGB"
    raw = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.ndim == 3 and raw.shape[2] == 3  # 3 channels in the file itself
    got = np.asarray(im, dtype=int).reshape(-1, 3).mean(0)
    assert np.abs(got - rgb).max() <= 6, f"{got} != {rgb}"  # 16-bit scaled, not clipped to white


def test_grey_pixels_are_kept_exactly_and_replicated():
    # a grey JPEG gives the same grey levels OpenCV decodes from it, in each of R, G and B
    data = _save(photo(5, (100, 80)).convert("L"), "JPEG", quality=90)
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    rgb = np.asarray(Image.open(io.BytesIO(_store(data, "png", image_size=200))))
    assert rgb.shape == grey.shape + (3,)
    for c in range(3):
        assert (rgb[:, :, c] == grey).all()


def _img2dataset_alone(data: bytes, encode_format: str) -> bytes:
    """img2dataset's resizer on the raw body, without our inspect/prepare."""
    from img2dataset.resizer import Resizer

    quality = 6 if encode_format == "png" else 95
    out = Resizer(
        image_size=32,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_format=encode_format,
        encode_quality=quality,
    )(io.BytesIO(data))
    assert out[-1] is None
    return out[0]


RGB_SOURCES = {
    "RGB.jpg": _save(photo(7, (120, 90)), "JPEG", quality=90),
    "RGB.png": _save(photo(7, (120, 90)), "PNG"),
    "RGB.webp": _save(photo(7, (120, 90)), "WEBP", quality=90),
    "RGBA.png": _save(photo(7, (120, 90)).convert("RGBA"), "PNG"),
}


@pytest.mark.parametrize("encode_format", FORMATS)
@pytest.mark.parametrize("name", sorted(RGB_SOURCES))
def test_rgb_sources_pass_through_unchanged(name, encode_format):
    data = RGB_SOURCES[name]
    info = inspect(data, max_pixels=10_000_000)
    assert not info.needs_normalize and prepare(data, info) is data
    assert _store(data, encode_format) == _img2dataset_alone(data, encode_format)


# sha256 of the stored bytes for RGB.jpg, computed with the code before issue 10's fix
# (Pillow 13.0.0, OpenCV 4.14.0: other versions encode differently, so the check is skipped there)
FROZEN = {
    "jpg": "a78533a1173b7ad8575027b0151d0e6e1b1a1ca08d0cc8102301764d56cf13d3",
    "png": "edb41f1288d88031b6635c0d659b42eb393d7426a1b46766f525c80666fdb72c",
    "webp": "2ce51dfeeb8243b47e2411c36dd7e91e0d07ac6ec1c21a1f58643c979c1bca1d",
}


FROZEN_WITH = ("13.0.0", "4.14.0")


@pytest.mark.skipif((PIL.__version__, cv2.__version__) != FROZEN_WITH, reason="hashes frozen with other versions")
@pytest.mark.parametrize("encode_format", FORMATS)
def test_rgb_jpeg_stored_bytes_unchanged_since_before_the_fix(encode_format):
    stored = _store(RGB_SOURCES["RGB.jpg"], encode_format, image_size=64)
    assert hashlib.sha256(stored).hexdigest() == FROZEN[encode_format]
