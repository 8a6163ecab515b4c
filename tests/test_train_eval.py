"""Zero-shot, linear-probe and retrieval numbers equal a direct reference computation; the eval
CLI and the in-training evals write JSON lines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthetic_shards import write_image_folder, write_shards
from wit_builder.train import eval as teval
from wit_builder.train import model as tmodel
from wit_builder.train.config import ModelConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(11)
    built = tmodel.build(ModelConfig(name="wit-eval-tiny", arch=tmodel.TINY_ARCH))
    built.model.eval()
    return built


def test_zero_shot_equals_reference(tiny, tmp_path):
    from PIL import Image

    root = write_image_folder(str(tmp_path / "zs"), per_class=3, classes=("red", "green", "blue", "navy_blue"))
    templates = tmp_path / "t.txt"
    templates.write_text("# comment\na photo of a {}.\na {} thing\n")
    got = teval.zero_shot(tiny.model, tiny.eval_transform, tiny.tokenizer, root, "", str(templates))
    # reference: straight from the definitions
    classes = ["blue", "green", "navy blue", "red"]  # sorted folders, "_" -> " "
    with torch.no_grad():
        weights = []
        for c in classes:
            e = tiny.model.encode_text(tiny.tokenizer([f"a photo of a {c}.", f"a {c} thing"]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            weights.append(m / m.norm())
        weights = torch.stack(weights)
        correct1 = correct5 = 0
        n = 0
        for label, folder in enumerate(["blue", "green", "navy_blue", "red"]):
            for name in sorted(os.listdir(os.path.join(root, folder))):
                x = tiny.eval_transform(Image.open(os.path.join(root, folder, name)).convert("RGB"))[None]
                f = tiny.model.encode_image(x)
                scores = (f / f.norm(dim=-1, keepdim=True)) @ weights.T
                order = scores[0].argsort(descending=True).tolist()
                correct1 += order[0] == label
                correct5 += label in order[:5]
                n += 1
    assert got["zeroshot_images"] == n == 12 and got["zeroshot_classes"] == 4
    assert got["zeroshot_top1"] == pytest.approx(correct1 / n, abs=1e-6)
    assert got["zeroshot_top5"] == pytest.approx(correct5 / n, abs=1e-6) == 1.0  # 4 classes < 5


def _reference_logistic(x, y, classes, l2, steps=20000, lr=0.5):
    """Plain full-batch gradient descent on mean CE + l2/2 |W|^2 (numpy, float64)."""
    x = x.astype(np.float64)
    w = np.zeros((x.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


def test_linear_probe_equals_reference():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    y_train = np.repeat(np.arange(3), 20)
    y_test = np.repeat(np.arange(3), 10)
    x_train = centers[y_train] + 1.2 * rng.normal(size=(60, 8))
    x_test = centers[y_test] + 1.2 * rng.normal(size=(30, 8))
    l2 = 0.05
    got = teval.linear_probe_features(
        torch.tensor(x_train), torch.tensor(y_train), torch.tensor(x_test), torch.tensor(y_test), 3, [l2]
    )
    w_ref, b_ref = _reference_logistic(x_train, y_train, 3, l2)
    w, b = teval.fit_logistic(torch.tensor(x_train), torch.tensor(y_train), 3, l2)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-4)
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), b_ref - b_ref.mean(), atol=1e-4)
    ref_acc = float(((x_test @ w_ref + b_ref).argmax(1) == y_test).mean())
    assert got["probe_top1"] == pytest.approx(ref_acc, abs=1e-9)
    assert 0.4 < ref_acc < 1.0  # a problem where the probe is neither trivial nor hopeless


def test_linear_probe_picks_l2_on_a_validation_split():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(40, 4)))
    y = torch.tensor((x[:, 0] > 0).long().numpy())
    got = teval.linear_probe_features(x, y, x, y, 2, [1e-3, 1e3])
    assert got["probe_l2"] == 1e-3 and got["probe_top1"] > 0.9


def test_retrieval_equals_reference():
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(7, 6, generator=g), dim=-1)
    text_image = [0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 1]  # several captions for some images
    texts = F.normalize(images[text_image] + 0.9 * torch.randn(len(text_image), 6, generator=g), dim=-1)
    got = teval.retrieval_features(images, texts, text_image)
    sim = (images @ texts.T).numpy()
    for k in (1, 5, 10):
        hits = 0
        for i in range(7):  # image -> text: rank of the best-ranked own caption
            order = list(np.argsort(-sim[i]))
            best = min(order.index(j) for j, owner in enumerate(text_image) if owner == i)
            hits += best < k
        assert got[f"image_to_text_r@{k}"] == pytest.approx(hits / 7)
        hits = 0
        for j, owner in enumerate(text_image):  # text -> image
            order = list(np.argsort(-sim[:, j]))
            hits += order.index(owner) < k
        assert got[f"text_to_image_r@{k}"] == pytest.approx(hits / len(text_image))
    assert got["image_to_text_r@1"] < 1.0  # noisy enough that recall@1 is not trivially perfect


def test_retrieval_groups_identical_images(tiny, tmp_path):
    from synthetic_shards import draw, jpeg_bytes

    img = jpeg_bytes(draw("red", "circle", 32))
    other = jpeg_bytes(draw("blue", "square", 32))
    pairs = [
        ("a", {"jpg": img, "txt": b"a red circle"}),
        ("b", {"jpg": img, "txt": b"red round thing"}),
        ("c", {"jpg": other, "txt": b"a blue square"}),
    ]
    got = teval.retrieval(tiny.model, tiny.eval_transform, tiny.tokenizer, pairs)
    assert got["retrieval_images"] == 2 and got["retrieval_texts"] == 3


@pytest.mark.timeout(120)
def test_training_runs_evals_every_n_steps_and_the_eval_cli_agrees(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), samples=64, tars=1, image_size=32)
    zs = write_image_folder(str(tmp_path / "zs"), per_class=2)
    cfg = load_config(
        os.path.join(REPO, "pipelines", "train-tiny.toml"),
        [
            "steps=4",
            "batch_size=8",
            "data.workers=0",
            "data.holdout_fraction=0.25",
            "eval.every=2",
            f'eval.zeroshot_dir="{zs}"',
            f'eval.probe_train_dir="{zs}"',
            f'eval.probe_test_dir="{zs}"',
            "eval.probe_l2=[0.01]",
        ],
    )
    from wit_builder.train.loop import train

    summary = train(cfg, shards, str(tmp_path / "out"))
    lines = [json.loads(x) for x in open(tmp_path / "out" / "eval.jsonl")]
    assert [x["step"] for x in lines] == [2, 4]  # no second eval of step 4 at the end
    final = lines[-1]
    assert {"zeroshot_top1", "zeroshot_top5", "probe_top1", "image_to_text_r@1", "text_to_image_r@10"} <= set(final)
    assert final["retrieval_texts"] > 0 and summary["eval"] == final
    # the standalone CLI on the saved checkpoint gives the same zero-shot and probe numbers
    out = tmp_path / "cli.jsonl"
    code = teval.main(
        [
            "--pretrained",
            summary["checkpoint"],
            "--zeroshot-dir",
            zs,
            "--probe-train",
            zs,
            "--probe-test",
            zs,
            "--probe-l2",
            "0.01",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    cli = json.loads(out.read_text())
    for key in ("zeroshot_top1", "zeroshot_top5", "probe_top1"):
        assert cli[key] == pytest.approx(final[key], abs=1e-6)


def test_bundled_templates_are_the_80_clip_prompts():
    templates = teval.load_templates()
    assert len(templates) == 80 == len(set(templates))
    assert templates[0] == "a bad photo of a {}." and all("{}" in t for t in templates)
