"""Evaluations of an open_clip model: zero-shot classification, linear probe, image<->text retrieval.

- zero-shot: an image folder with one sub-folder per class; each class's text embedding is the
  re-normalised mean of the normalised embeddings of every prompt template filled with its name;
  top-1 / top-5 accuracy (top-k capped at the number of classes).
- linear probe (as in the CLIP paper): multinomial logistic regression with an L2 penalty on
  frozen, normalised image features, fitted by L-BFGS in float64; the penalty is chosen on a
  validation split (every 5th train image) among the given strengths, then refitted on all of
  the train folder; top-1 on the test folder.
- retrieval: held-out pairs; pairs with byte-identical images form one image with several
  captions (COCO style); recall@1/5/10 for image->text and text->image.

Run on any open_clip checkpoint (local, or on an object store: s3://..., downloaded first):
    $ python -m wit_builder.train.eval --pretrained runs/demo/train/checkpoints/step_00000020 \\
        --zeroshot-dir runs/demo/zeroshot --out runs/demo/eval.jsonl

Example (metrics on given features):
    >>> import torch
    >>> recall_at_k(torch.eye(3), [[0], [1], [2]], (1,))
    {'r@1': 1.0}
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from wit_builder.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ---------------------------------------------------------------------------- inputs
def load_templates(path: str = "") -> list[str]:
    """Prompt templates, one per line with `{}` for the class name; `#` lines are comments."""
    from wit_builder.train.config import DEFAULT_TEMPLATES

    with open(path or DEFAULT_TEMPLATES, encoding="utf-8") as f:
        templates = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"templates file {path or DEFAULT_TEMPLATES}: every line needs a {{}} ({bad[:3]})")
    return templates


def image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(image paths, class index per image, class folder names) of a folder-per-class tree."""
    if not os.path.isdir(root):
        raise ConfigError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, c))):
            if name.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(root, c, name))
                labels.append(i)
    if not paths:
        raise ConfigError(f"image folder {root} has no images in class sub-folders")
    return paths, labels, classes


def class_names(classes: list[str], path: str = "") -> list[str]:
    """Names from the class-names file (one per line, sorted-folder order) or from folder names."""
    if not path:
        return [c.replace("_", " ") for c in classes]
    with open(path, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    if len(names) != len(classes):
        raise ConfigError(f"class names file {path} has {len(names)} names for {len(classes)} class folders")
    return names


# ---------------------------------------------------------------------------- features
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, transform: Callable, images: Iterable, batch_size: int = 64) -> torch.Tensor:
    """Normalised float32 image features (CPU) for paths, raw bytes or PIL images."""
    from PIL import Image

    device, feats, buf = _device_of(model), [], []

    def flush():
        if buf:
            x = torch.stack(buf).to(device)
            feats.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
            buf.clear()

    for item in images:
        if isinstance(item, (bytes, bytearray)):
            item = io.BytesIO(item)
        im = Image.open(item) if not isinstance(item, Image.Image) else item
        buf.append(transform(im.convert("RGB")))
        if len(buf) == batch_size:
            flush()
    flush()
    return torch.cat(feats) if feats else torch.empty(0)


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    device, feats = _device_of(model), []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats)


# ---------------------------------------------------------------------------- zero-shot
def zero_shot_weights(model, tokenizer: Callable, names: list[str], templates: list[str]) -> torch.Tensor:
    """(classes, dim): per class, the normalised mean of its normalised template embeddings."""
    rows = []
    for name in names:
        emb = encode_texts(model, tokenizer, [t.format(name) for t in templates])
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(1).sum()) / len(labels)


def zero_shot(
    model,
    transform: Callable,
    tokenizer: Callable,
    folder: str,
    names_file: str = "",
    templates_file: str = "",
    batch_size: int = 64,
) -> dict[str, Any]:
    paths, labels, classes = image_folder(folder)
    weights = zero_shot_weights(model, tokenizer, class_names(classes, names_file), load_templates(templates_file))
    logits = encode_images(model, transform, paths, batch_size) @ weights.T
    y = torch.tensor(labels)
    return {
        "zeroshot_top1": topk_accuracy(logits, y, 1),
        "zeroshot_top5": topk_accuracy(logits, y, 5),
        "zeroshot_classes": len(classes),
        "zeroshot_images": len(paths),
    }


# ---------------------------------------------------------------------------- linear probe
def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int = 500):
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias free) by L-BFGS; returns (W, b)."""
    x = x.double()
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w, b, x, y) -> float:
    return int(((x.double() @ w + b).argmax(1) == y).sum()) / len(y)


def linear_probe_features(train_x, train_y, test_x, test_y, classes: int, l2_grid: list[float]) -> dict[str, Any]:
    """Choose the L2 strength on a validation split (every 5th train row), refit, test top-1."""
    l2 = l2_grid[0]
    if len(l2_grid) > 1:
        idx = torch.arange(len(train_y))
        val, fit = idx % 5 == 0, idx % 5 != 0
        scores = [
            _accuracy(*fit_logistic(train_x[fit], train_y[fit], classes, c), train_x[val], train_y[val])
            for c in l2_grid
        ]
        l2 = l2_grid[max(range(len(scores)), key=lambda i: scores[i])]
    w, b = fit_logistic(train_x, train_y, classes, l2)
    return {
        "probe_top1": _accuracy(w, b, test_x, test_y),
        "probe_l2": l2,
        "probe_train_images": len(train_y),
        "probe_test_images": len(test_y),
    }


def linear_probe(
    model, transform: Callable, train_dir: str, test_dir: str, l2_grid: list[float], batch_size: int = 64
) -> dict[str, Any]:
    train_paths, train_labels, classes = image_folder(train_dir)
    test_paths, test_labels, test_classes = image_folder(test_dir)
    if test_classes != classes:
        raise ConfigError(f"probe folders differ in classes: {classes} vs {test_classes}")
    return linear_probe_features(
        encode_images(model, transform, train_paths, batch_size),
        torch.tensor(train_labels),
        encode_images(model, transform, test_paths, batch_size),
        torch.tensor(test_labels),
        len(classes),
        list(l2_grid),
    )


# ---------------------------------------------------------------------------- retrieval
def recall_at_k(sim: torch.Tensor, image_texts: list[list[int]], ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text recall from a (images, texts) similarity; image i's captions are image_texts[i]."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        hits = [bool(set(top[i].tolist()) & set(t)) for i, t in enumerate(image_texts)]
        out[f"r@{k}"] = sum(hits) / len(hits)
    return out


def retrieval_features(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: list[int]) -> dict[str, float]:
    """recall@1/5/10 both ways; text j shows image text_image[j]."""
    sim = image_feats @ text_feats.T
    image_texts: list[list[int]] = [[] for _ in range(image_feats.shape[0])]
    for j, i in enumerate(text_image):
        image_texts[i].append(j)
    i2t = recall_at_k(sim, image_texts)
    t2i = recall_at_k(sim.T, [[i] for i in text_image])
    return {
        **{f"image_to_text_{k}": v for k, v in i2t.items()},
        **{f"text_to_image_{k}": v for k, v in t2i.items()},
        "retrieval_images": image_feats.shape[0],
        "retrieval_texts": text_feats.shape[0],
    }


def retrieval(
    model, transform: Callable, tokenizer: Callable, pairs: Iterable[tuple[str, dict[str, bytes]]], batch_size: int = 64
) -> dict[str, Any]:
    """Retrieval on (key, {ext: bytes}) samples with an image and a .txt caption."""
    from wit_builder.train.data import IMAGE_EXTS

    image_of: dict[str, int] = {}
    images: list[bytes] = []
    texts: list[str] = []
    text_image: list[int] = []
    for _key, parts in pairs:
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None or "txt" not in parts:
            continue
        digest = hashlib.sha256(parts[ext]).hexdigest()
        if digest not in image_of:
            image_of[digest] = len(images)
            images.append(parts[ext])
        texts.append(parts["txt"].decode("utf-8"))
        text_image.append(image_of[digest])
    if not texts:
        raise ConfigError("retrieval: no held-out pairs (set data.holdout_fraction or eval.retrieval_manifest)")
    return retrieval_features(
        encode_images(model, transform, images, batch_size), encode_texts(model, tokenizer, texts), text_image
    )


# ---------------------------------------------------------------------------- all of them
def run_evals(
    model,
    transform: Callable,
    tokenizer: Callable,
    ecfg,
    device=None,
    retrieval_manifest=None,
    holdout_fraction: float | None = None,
) -> dict[str, Any]:
    """Every evaluation `ecfg` (an EvalConfig) asks for; one flat dict of metrics."""
    from wit_builder.train.data import iter_samples

    was_training = model.training
    model.eval()
    result: dict[str, Any] = {}
    try:
        if ecfg.zeroshot_dir:
            result.update(
                zero_shot(
                    model, transform, tokenizer, ecfg.zeroshot_dir, ecfg.classnames, ecfg.templates, ecfg.batch_size
                )
            )
        if ecfg.probe_train_dir and ecfg.probe_test_dir:
            result.update(
                linear_probe(
                    model, transform, ecfg.probe_train_dir, ecfg.probe_test_dir, ecfg.probe_l2, ecfg.batch_size
                )
            )
        if retrieval_manifest is not None:
            result.update(
                retrieval(
                    model, transform, tokenizer, iter_samples(retrieval_manifest, holdout_fraction), ecfg.batch_size
                )
            )
    finally:
        model.train(was_training)
    return result


def load_model(pretrained: str, name: str = ""):
    """(model, eval transform, tokenizer) from a training output folder (its latest checkpoint), a
    checkpoint folder of ours (open_clip_config.json + weights, loaded via open_clip's
    `local-dir:`), or a weights file with an architecture `name`; any of them local or an fsspec
    URL (s3://...: the checkpoint's files are downloaded to a temporary folder, then removed)."""
    import open_clip

    from wit_builder import io as wio
    from wit_builder.train.checkpoints import latest_checkpoint

    if not wio.is_local(pretrained):
        with tempfile.TemporaryDirectory(prefix="wit-eval-") as scratch:
            return load_model(_download(latest_checkpoint(pretrained) or pretrained, scratch), name)
    if os.path.isdir(pretrained) and latest_checkpoint(pretrained):  # a training output folder
        pretrained = latest_checkpoint(pretrained)
    if os.path.isdir(pretrained) and os.path.exists(os.path.join(pretrained, "open_clip_config.json")):
        ref = "local-dir:" + os.path.abspath(pretrained)
        model, _, transform = open_clip.create_model_and_transforms(ref)
        return model, transform, open_clip.get_tokenizer(ref)
    if not os.path.isfile(pretrained):
        raise ConfigError(f"--pretrained {pretrained}: not a checkpoint folder or weights file")
    if not name:
        raise ConfigError("--model NAME is needed with a weights file")
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model, transform, open_clip.get_tokenizer(name)


def _download(url: str, folder: str) -> str:
    """Copy a checkpoint folder's files (or one weights file) at `url` into `folder`; returns
    the local folder (or file)."""
    from wit_builder import io as wio

    fs, inner = wio.filesystem(url)
    if fs.isdir(inner):
        for path in fs.ls(inner, detail=False):
            if fs.isfile(path):
                fs.get_file(path, os.path.join(folder, path.rstrip("/").rsplit("/", 1)[-1]))
        return folder
    if not fs.isfile(inner):
        raise ConfigError(f"--pretrained {url}: not found")
    local = os.path.join(folder, inner.rsplit("/", 1)[-1])
    fs.get_file(inner, local)
    return local


def main(argv: list[str] | None = None) -> int:
    from wit_builder.train.config import EvalConfig
    from wit_builder.train.data import load_manifest

    p = argparse.ArgumentParser(
        prog="python -m wit_builder.train.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m wit_builder.train.eval --pretrained runs/demo/train "
        "--zeroshot-dir runs/demo/train/zeroshot --out runs/demo/eval.jsonl",
    )
    p.add_argument(
        "--pretrained",
        required=True,
        help="training --out folder (latest checkpoint), checkpoint folder, or open_clip weights file",
    )
    p.add_argument("--model", default="", help="open_clip architecture name (with a weights file)")
    p.add_argument("--model-config", default="", help="JSON model config to register (custom architectures)")
    p.add_argument("--zeroshot-dir", default="")
    p.add_argument("--classnames", default="")
    p.add_argument("--templates", default="")
    p.add_argument("--probe-train", default="")
    p.add_argument("--probe-test", default="")
    p.add_argument("--probe-l2", default="1e-4,1e-3,1e-2,1e-1,1", help="comma-separated L2 strengths")
    p.add_argument("--retrieval", default="", help="a shards manifest of held-out pairs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="", help="append the JSON line here (always printed)")
    args = p.parse_args(argv)
    try:
        if args.model_config:
            import open_clip

            open_clip.add_model_config(args.model_config)
        model, transform, tokenizer = load_model(args.pretrained, args.model)
        ecfg = EvalConfig(
            zeroshot_dir=args.zeroshot_dir,
            classnames=args.classnames,
            templates=args.templates,
            probe_train_dir=args.probe_train,
            probe_test_dir=args.probe_test,
            probe_l2=[float(v) for v in args.probe_l2.split(",")],
            batch_size=args.batch_size,
        )
        manifest = load_manifest(args.retrieval) if args.retrieval else None
        result = {"pretrained": args.pretrained, **run_evals(model, transform, tokenizer, ecfg, None, manifest, None)}
    except ConfigError as e:
        print(f"wit_builder.train.eval: error: {e}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
