"""Face blurring: the detector's recall and precision on the hand-labelled demo faces, a real
face blurred (pixels change inside the box and nowhere else), and the download stage's
`faces_blurred` column."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from test_download import make_selection
from wit_builder import io
from wit_builder.faces import Box, FaceBlurrer, FaceDetector, blur_boxes, match_boxes
from wit_builder.resize import ImageResizer, ResizeSettings, inspect, prepare
from wit_builder.stages import download
from wit_builder.tario import read_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = os.path.join(REPO, "tests", "data", "faces", "labels.json")
DEMO = os.path.join(REPO, "demo", "images")
FACE_PHOTO = "117425.jpg"  # a toddler, face turned three-quarters to the camera
NO_FACE_PHOTO = "252332.jpg"  # a stop sign


def _stored(name: str, size: int = 256, blurrer=None, fmt: str = "png"):
    """(decoded BGR, Resized) of demo photo `name` as the download stage stores it (png: lossless)."""
    data = open(os.path.join(DEMO, name), "rb").read()
    quality = 3 if fmt == "png" else 95
    resizer = ImageResizer(ResizeSettings(image_size=size, encode_format=fmt, encode_quality=quality), blurrer=blurrer)
    out = resizer(prepare(data, inspect(data, 10**9)))
    return cv2.imdecode(np.frombuffer(out.data, np.uint8), cv2.IMREAD_COLOR), out


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()  # the download stage's default: MTCNN, min_score 0.7


def test_labels_cover_every_demo_photo_and_fit_the_stored_size():
    doc = json.load(open(LABELS))
    assert sorted(doc["images"]) == sorted(os.listdir(DEMO))
    assert sum(len(b) for b in doc["images"].values()) >= 25
    for name in ("790.jpg", "256353.jpg", "347254.jpg"):  # a few photos: boxes inside the image
        img, _ = _stored(name, fmt="jpg")
        h, w = img.shape[:2]
        for x0, y0, x1, y1 in doc["images"][name]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


@pytest.mark.timeout(240)
def test_recall_and_precision_on_the_labelled_demo_faces(detector):
    """benchmarks/RESULTS.md states the figures (20 of 29 faces, 22 detections, 20 right);
    they are checked here with a little slack for OpenCV builds."""
    doc = json.load(open(LABELS))
    faces = hits = found = 0
    for name, truth in doc["images"].items():
        img, _ = _stored(name, fmt="jpg")
        boxes = [(b.x0, b.y0, b.x1, b.y1, b.score) for b in detector.detect(img)]
        faces += len(truth)
        found += len(boxes)
        hits += len(match_boxes(boxes, truth, 0.3))
    recall, precision = hits / faces, hits / found
    assert recall >= 0.62, (hits, faces)
    assert precision >= 0.85, (hits, found)


def test_a_real_face_is_blurred_inside_its_box_and_nowhere_else(detector):
    plain, _ = _stored(FACE_PHOTO)
    blurrer = FaceBlurrer(detector, margin=0.25)
    blurred, out = _stored(FACE_PHOTO, blurrer=blurrer)
    boxes = detector.detect(plain)
    assert out.faces == len(boxes) >= 1
    inside = np.zeros(plain.shape[:2], bool)
    h, w = inside.shape
    for b in boxes:
        mx, my = round((b.x1 - b.x0) * 0.25), round((b.y1 - b.y0) * 0.25)
        inside[max(0, b.y0 - my) : min(h, b.y1 + my), max(0, b.x0 - mx) : min(w, b.x1 + mx)] = True
    changed = (plain != blurred).any(axis=2)
    assert not (changed & ~inside).any()  # nothing outside the enlarged boxes moved
    for b in boxes:  # and the face itself lost its detail
        face, hidden = plain[b.y0 : b.y1, b.x0 : b.x1], blurred[b.y0 : b.y1, b.x0 : b.x1]
        assert changed[b.y0 : b.y1, b.x0 : b.x1].mean() > 0.9
        sharp = cv2.Laplacian(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
        left = cv2.Laplacian(cv2.cvtColor(hidden, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
        assert left < 0.05 * sharp
    assert not detector.detect(blurred)  # the detector cannot find the blurred face again


def test_blur_is_deterministic_and_bounded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    a = blur_boxes(img, [Box(60, 40, 90, 80)])  # runs off the image: clipped
    assert np.array_equal(a, blur_boxes(img, [Box(60, 40, 90, 80)]))
    assert np.array_equal(a[:30], img[:30]) and not np.array_equal(a[40:, 60:], img[40:, 60:])
    assert np.array_equal(blur_boxes(img, []), img)


def test_no_face_no_change(detector):
    plain, _ = _stored(NO_FACE_PHOTO)
    blurred, out = _stored(NO_FACE_PHOTO, blurrer=FaceBlurrer(detector))
    assert out.faces == 0 and np.array_equal(plain, blurred)


@pytest.mark.timeout(120)
def test_download_counts_faces_blurred(static_server, tmp_path):
    base_url, root = static_server
    names = [FACE_PHOTO, NO_FACE_PHOTO]
    for name in names:
        with open(os.path.join(root, f"faces-{name}"), "wb") as f:
            f.write(open(os.path.join(DEMO, name), "rb").read())
    urls = [f"{base_url}/faces-{n}" for n in names]
    got = {}
    for blur in (True, False):
        run_dir = str(tmp_path / f"blur-{blur}")
        rows = make_selection(run_dir, urls, parts=1)
        cfg = download.Config(shard_size=10, threads_per_task=2, allow_private_network=True, blur_faces=blur)
        (spec,) = download.plan_shards(download.selected_parts(io.join(run_dir, "selected")), 10)
        out_dir = io.join(run_dir, "download")
        counts = download.download_shard(spec, cfg, out_dir)
        assert counts["successes"] == 2
        table = io.read_parquet(download.samples_path(out_dir, spec.name))
        by_uid = dict(zip(table["uid"].to_pylist(), table["faces_blurred"].to_pylist()))
        images = {n[:-4]: d for n, d in read_tar(download.tar_path(out_dir, spec.name)) if n.endswith(".jpg")}
        got[blur] = ([by_uid[r["uid"]] for r in rows], [images[r["uid"]] for r in rows])
        assert counts["faces_blurred"] == sum(n or 0 for n in got[blur][0])  # the shard's marker
    (face_count, no_face_count), (face_img, no_face_img) = got[True]
    assert face_count >= 1 and no_face_count == 0
    assert got[False][0] == [None, None]  # blurring off: null, not 0
    assert face_img != got[False][1][0] and no_face_img == got[False][1][1]
