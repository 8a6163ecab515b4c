"""The one module that wraps img2dataset's resizer: check, normalise, resize, encode an image.

Three steps per downloaded body:
1. `inspect(data, max_pixels)`: PIL opens the header only (no pixel decoding) and we refuse
   non-images ("not_an_image"), more than `max_pixels` pixels ("too_many_pixels", so a
   20000x20000 PNG bomb is never decoded) and JPEGs whose last scan has no end marker
   ("truncated": OpenCV would silently decode the missing part as grey).
2. `prepare(data, info)`: most bodies (8-bit colour JPEG/PNG/WebP without EXIF rotation) go
   to the resizer untouched. The rest, which img2dataset's OpenCV decode gets wrong or keeps
   in a mode other than RGB, are normalised with PIL first: EXIF orientation applied, CMYK ->
   RGB, 16-bit -> 8-bit (scaled, not clipped), alpha/palette transparency matted on white
   (img2dataset's rule), greyscale and 1-bit -> RGB, GIF/other formats -> first frame in RGB.
   They are handed over as a lossless 3-channel BMP, so every stored image is RGB.
3. `ImageResizer(settings)(prepared)`: img2dataset's `Resizer` (resize modes "no",
   "keep_ratio", "center_crop", "border", "keep_ratio_largest"; encode format jpg/png/webp and
   quality) does the resize and the encode; a decode failure is "decode_error".

Privacy: every stored image is re-encoded by OpenCV from decoded pixels (the Resizer is built
with skip_reencode=False, and our own normalisation writes a BMP), so nothing of the source
file's metadata reaches the tar: no EXIF (GPS, camera, dates), XMP, IPTC, ICC profile or
comment, also when the image is not resized (checked by tests/test_exif.py). With
`keep_metadata=True` (download key of the same name) the source's EXIF (orientation reset to
1, the pixels are already upright), XMP, ICC profile and comment are copied into the stored
JPEG as their own segments (jpg output only).

Faces: with a `FaceBlurrer` (wit_builder.faces) the Resizer calls it on the resized pixels
right before encoding, and `Resized.faces` says how many faces were blurred.

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
from typing import Any, Literal

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
    faces: int | None = None  # faces blurred; None when face blurring is off
    original_sha256: str | None = None  # of the fetched bytes (set by the download stage)


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
            info.needs_normalize = mode != "RGB" or orientation not in (1, None)
        elif fmt == "PNG":  # OpenCV expands palette and grey+alpha to BGR(A), but keeps plain grey
            info.needs_normalize = _png_bit_depth(data) == 16 or mode not in ("RGB", "RGBA", "P", "LA")
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
    """Decode with PIL, apply EXIF orientation, and encode as a lossless 3-channel BMP."""
    import cv2

    Image = _pil()
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as src:
        src.seek(0)
        try:
            im = ImageOps.exif_transpose(src)
        except Exception:
            im = src.copy()
    if im is None:
        raise ImageRejected("decode_error")
    ok, enc = cv2.imencode(".bmp", _to_bgr(im, _known_16bit(data, info)))
    if not ok:
        raise ImageRejected("decode_error")
    return enc.tobytes()


def _known_16bit(data: bytes, info: ImageInfo) -> bool:
    """True when the file itself says its samples are 16-bit (a PNG's IHDR bit depth)."""
    return info.format == "PNG" and _png_bit_depth(data) == 16


def _to_bgr(im, known_16bit: bool = False):
    """`im` as a contiguous uint8 BGR array (H, W, 3), whatever its mode."""
    import cv2
    import numpy as np

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _wide_grey_to_8bit(np.asarray(im), sixteen=known_16bit or mode.startswith("I;16"))
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4]
        rgb = alpha / 255 * rgba[:, :, :3] + 255 - alpha  # matte on white, as img2dataset does
        return cv2.cvtColor(np.rint(rgb.clip(0, 255)).astype(np.uint8), cv2.COLOR_RGB2BGR)
    if mode in ("L", "1"):
        return cv2.cvtColor(np.asarray(im.convert("L")), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)  # P, CMYK, YCbCr, RGB ...


def _wide_grey_to_8bit(arr, sixteen: bool):
    """8-bit grey from 16/32-bit or float samples, scaled by the sample width, not clipped.

    16-bit samples keep their top byte (0x8000 -> 128). A 32-bit "I" image of unknown width is
    scaled by its largest value: up to 255 as 8-bit, up to 65535 as 16-bit, beyond as 31-bit.
    Floats are taken as 0-255 values (clipped), as before.

    >>> import numpy as np
    >>> _wide_grey_to_8bit(np.array([[0, 0x8000, 0xFFFF]], np.uint16), sixteen=True).tolist()
    [[0, 128, 255]]
    >>> _wide_grey_to_8bit(np.array([[7, 200]], np.int32), sixteen=False).tolist()
    [[7, 200]]
    >>> _wide_grey_to_8bit(np.array([[-5, 0x8000]], np.int32), sixteen=False).tolist()
    [[0, 128]]
    """
    import numpy as np

    if arr.dtype.kind == "f":
        return np.clip(arr, 0, 255).astype(np.uint8)
    if sixteen:
        shift = 8
    else:
        top = int(arr.max(initial=0))
        shift = 0 if top <= 0xFF else 8 if top <= 0xFFFF else 23
    wide = np.clip(arr, 0, None)  # a writable copy in the source dtype; shifted in place
    np.right_shift(wide, shift, out=wide)
    np.minimum(wide, 255, out=wide)
    return wide.astype(np.uint8)


_RESIZE_LOCK = threading.Lock()


class ImageResizer:
    """img2dataset's Resizer behind our settings; call it with `prepare`d bytes.

    `blurrer`: a wit_builder.faces.FaceBlurrer run on the resized pixels before encoding.
    `keep_metadata`: copy the source's metadata into the stored JPEG (pass `original`).
    """

    def __init__(self, settings: ResizeSettings, blurrer: Any = None, keep_metadata: bool = False):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.resizer import Resizer

        if keep_metadata and settings.encode_format != "jpg":
            raise ValueError("keep_metadata needs encode_format 'jpg'")
        self.settings = settings
        self.blurrer = blurrer
        self.keep_metadata = keep_metadata
        self._resizer = Resizer(**dataclasses.asdict(settings), blurrer=blurrer)  # the same keyword names

    def __call__(self, prepared: bytes, original: bytes | None = None) -> Resized:
        with _RESIZE_LOCK:
            if self.blurrer is not None:
                self.blurrer.faces = 0
            img, width, height, ow, oh, err = self._resizer(
                io.BytesIO(prepared), blurring_bbox_list=[] if self.blurrer is not None else None
            )
            faces = self.blurrer.faces if self.blurrer is not None else None
        if err is not None or img is None:
            raise ImageRejected("decode_error")
        if self.keep_metadata and original is not None:
            img = copy_metadata(original, img)
        return Resized(img, int(width), int(height), int(ow), int(oh), faces)


# -- metadata --------------------------------------------------------------------------------

_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
_ICC_ID = b"ICC_PROFILE\x00"


def _segment(marker: int, payload: bytes) -> list[bytes]:
    """JPEG segments (0xFF, marker, 2-byte length, payload); over-long payloads are dropped."""
    if len(payload) + 2 > 0xFFFF:
        return []
    return [bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload]


def _icc_segments(icc: bytes) -> list[bytes]:
    """An ICC profile as numbered APP2 chunks (the ICC spec's way for profiles over 64 KB)."""
    step = 0xFFFF - 2 - len(_ICC_ID) - 2
    chunks = [icc[i : i + step] for i in range(0, len(icc), step)][:255]
    out: list[bytes] = []
    for n, chunk in enumerate(chunks, 1):
        out += _segment(0xE2, _ICC_ID + bytes([n, len(chunks)]) + chunk)
    return out


def copy_metadata(original: bytes, jpeg: bytes) -> bytes:
    """`jpeg` with the EXIF (orientation set to 1), XMP, ICC profile and comment of `original`
    (any format Pillow reads) inserted right after its SOI marker."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(original)) as im:
            info = dict(im.info)
            exif = im.getexif()
    except Exception:
        return jpeg
    segments: list[bytes] = []
    if len(exif):
        exif[0x0112] = 1  # the stored pixels are already upright
        segments += _segment(0xE1, b"Exif\x00\x00" + exif.tobytes())
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if xmp:
        segments += _segment(0xE1, _XMP_ID + (xmp.encode() if isinstance(xmp, str) else xmp))
    if info.get("icc_profile"):
        segments += _icc_segments(info["icc_profile"])
    comment = info.get("comment")
    if comment:
        segments += _segment(0xFE, comment.encode() if isinstance(comment, str) else comment)
    return jpeg[:2] + b"".join(segments) + jpeg[2:] if segments and jpeg[:2] == b"\xff\xd8" else jpeg


def metadata_markers(data: bytes) -> list[str]:
    """What an image file carries beyond pixels: JPEG APP1-APP15 and COM segments ("APP1:Exif",
    "APP1:XMP", "APP2:ICC", "COM", ...), PNG text/exif/ICC chunks, WebP EXIF/XMP/ICCP chunks.

    >>> metadata_markers(b"\\xff\\xd8\\xff\\xe0\\x00\\x04JF\\xff\\xda")
    []
    """
    out: list[str] = []
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker in (0xDA, 0xD9):  # start of scan / end of image: no more headers
                break
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            body = data[pos + 4 : pos + 2 + length]
            if 0xE1 <= marker <= 0xEF:
                kind = "Exif" if body.startswith(b"Exif") else "XMP" if body.startswith(_XMP_ID[:20]) else ""
                kind = "ICC" if body.startswith(_ICC_ID) else kind
                out.append(f"APP{marker - 0xE0}" + (f":{kind}" if kind else ""))
            elif marker == 0xFE:
                out.append("COM")
            pos += 2 + length
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8
        while pos + 8 <= len(data):
            length = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8].decode("latin-1")
            if kind in ("tEXt", "zTXt", "iTXt", "eXIf", "iCCP", "tIME"):
                out.append(kind)
            pos += 12 + length
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        pos = 12
        while pos + 8 <= len(data):
            kind = data[pos : pos + 4].decode("latin-1")
            length = int.from_bytes(data[pos + 4 : pos + 8], "little")
            if kind in ("EXIF", "XMP ", "ICCP"):
                out.append(kind.strip())
            pos += 8 + length + (length & 1)
    return out
