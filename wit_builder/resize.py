"""The one module that wraps img2dataset's resizer: check, normalise, resize, encode an image.

Three steps per downloaded body:
1. `inspect(data, max_pixels)`: PIL opens the header only (no pixel decoding) and we refuse
   non-images ("not_an_image"), more than `max_pixels` pixels ("too_many_pixels", so a
   20000x20000 PNG bomb is never decoded) and JPEGs whose last scan has no end marker
   ("truncated": OpenCV would silently decode the missing part as grey).
2. `prepare(data, info)`: most bodies (8-bit JPEG/PNG/WebP without EXIF rotation) go to the
   resizer untouched. The few that img2dataset's OpenCV decode gets wrong are normalised with
   PIL first: EXIF orientation applied, CMYK -> RGB, 16-bit -> 8-bit (scaled, not clipped),
   alpha/palette transparency matted on white (img2dataset's rule), GIF/other formats ->
   first frame in RGB. They are handed over as a lossless BMP.
3. `ImageResizer(settings)(prepared)`: img2dataset's `Resizer` (resize modes "no",
   "keep_ratio", "center_crop", "border", "keep_ratio_largest"; encode format jpg/png/webp and
   quality) does the resize and the encode; a decode failure is "decode_error".

img2dataset's Resizer swaps process-wide stdout/stderr file descriptors on every call, so
calls are serialised by a lock here (the download stage resizes on one thread per task, as
img2dataset does).

Example:
    >>> import io as _io
    >>> from PIL import Image
    >>> buf = _io.BytesIO(); Image.new("RGB", (640, 480), (200, 30, 30)).save(buf, "JPEG")
    >>> info = inspect(buf.getvalue(), max_pixels=10_000_000)
    >>> (info.format, info.width, info.height, info.needs_normalize)
    ('JPEG', 640, 480, False)
    >>> out = ImageResizer(ResizeSettings(image_size=256))(prepare(buf.getvalue(), info))
    >>> (out.width, out.height, out.original_width, out.original_height)
    (341, 256, 640, 480)
    >>> inspect(b"<html>hello</html>", max_pixels=100).error
    'not_an_image'
"""

from __future__ import annotations

import dataclasses

import io
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

ResizeMode = Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"]
EncodeFormat = Literal["jpg", "png", "webp"]
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")

_PASS_THROUGH = {"JPEG", "MPO", "PNG", "WEBP"}  # formats OpenCV decodes correctly when 8-bit


@dataclass(frozen=True)
class ResizeSettings:
    """Resize/encode settings, with img2dataset's meaning."""

    image_size: int = 256
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = True
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95  # jpg/webp: 0-100; png: compression 0-9

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        for name in ("upscale_interpolation", "downscale_interpolation"):
            if getattr(self, name).lower() not in INTERPOLATIONS:
                raise ValueError(f"{name} must be one of {', '.join(INTERPOLATIONS)}")
        top = 9 if self.encode_format == "png" else 100
        if not 0 <= self.encode_quality <= top:
            raise ValueError(f"encode_quality for {self.encode_format} must be in 0..{top}")


@dataclass
class ImageInfo:
    """What the header says; `error` is set when the body is refused."""

    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    needs_normalize: bool = False
    error: str | None = None


@dataclass
class Resized:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


class ImageRejected(Exception):
    """A per-image failure; `reason` is the short status string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _pil():
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return Image


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 25 and data[12:16] == b"IHDR" else 8


def _jpeg_truncated(data: bytes) -> bool:
    """True when the last start-of-scan has no end-of-image marker after it."""
    sos = data.rfind(b"\xff\xda")
    return sos < 0 or data.find(b"\xff\xd9", sos) < 0


def inspect(data: bytes, max_pixels: int) -> ImageInfo:
    """Read format, mode and size from the header only; set `error` when refused."""
    Image = _pil()
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return ImageInfo(error="too_many_pixels")
    except Exception:  # UnidentifiedImageError, SyntaxError, struct errors ...
        return ImageInfo(error="not_an_image")
    with im:
        fmt, mode = im.format, im.mode
        width, height = im.size
        info = ImageInfo(format=fmt, mode=mode, width=width, height=height)
        if width <= 0 or height <= 0:
            info.error = "decode_error"
            return info
        if width * height > max_pixels:
            info.error = "too_many_pixels"
            return info
        if fmt in ("JPEG", "MPO"):
            if _jpeg_truncated(data):
                info.error = "truncated"
                return info
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
            info.needs_normalize = mode not in ("RGB", "L") or orientation not in (1, None)
        elif fmt == "PNG":
            info.needs_normalize = _png_bit_depth(data) == 16 or mode not in ("RGB", "RGBA", "L", "P", "LA")
        elif fmt == "WEBP":
            info.needs_normalize = mode not in ("RGB", "RGBA")
        else:
            info.needs_normalize = True
    return info


_NORMALISE_SLOTS = threading.BoundedSemaphore(2)


def prepare(data: bytes, info: ImageInfo) -> bytes:
    """The bytes to hand to the resizer: `data` itself, or a normalised lossless BMP."""
    if not info.needs_normalize:
        return data
    try:
        with _NORMALISE_SLOTS:  # bounds the memory of full-size decodes in fetch threads
            return _normalise(data, info)
    except ImageRejected:
        raise
    except Exception:
        raise ImageRejected("decode_error") from None


def _normalise(data: bytes, info: ImageInfo) -> bytes:
    import cv2
    import numpy as np
    from PIL import ImageOps

    Image = _pil()
    with Image.open(io.BytesIO(data)) as src:
        src.seek(0)
        try:
            im = ImageOps.exif_transpose(src)
        except Exception:
            im = src.copy()
    if im is None:
        raise ImageRejected("decode_error")
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and info.format == "PNG" and _png_bit_depth(data) == 16):
        arr = (np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)
    elif mode in ("I", "F"):
        arr = np.clip(np.asarray(im, dtype=np.float32), 0, 255).astype(np.uint8)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4]
        rgb = alpha / 255 * rgba[:, :, :3] + 255 - alpha  # matte on white, as img2dataset does
        arr = np.rint(rgb.clip(0, 255)).astype(np.uint8)[:, :, ::-1]
    elif mode in ("L", "1"):
        arr = np.asarray(im.convert("L"))
    else:
        arr = np.asarray(im.convert("RGB"))[:, :, ::-1]
    ok, enc = cv2.imencode(".bmp", np.ascontiguousarray(arr))
    if not ok:
        raise ImageRejected("decode_error")
    return enc.tobytes()


_RESIZE_LOCK = threading.Lock()


class ImageResizer:
    """img2dataset's Resizer behind our settings; call it with `prepare`d bytes."""

    def __init__(self, settings: ResizeSettings):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.resizer import Resizer

        self.settings = settings
        self._resizer = Resizer(**dataclasses.asdict(settings))  # the same keyword names

    def __call__(self, prepared: bytes) -> Resized:
        with _RESIZE_LOCK:
            img, width, height, ow, oh, err = self._resizer(io.BytesIO(prepared))
        if err is not None or img is None:
            raise ImageRejected("decode_error")
        return Resized(img, int(width), int(height), int(ow), int(oh))
