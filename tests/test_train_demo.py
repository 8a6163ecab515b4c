"""The demo's labelled zero-shot folder rule and the one-call demo training step."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from synthetic_shards import draw, write_captioned_photo_shards
from wit_builder.train.demo_classes import (
    assign_classes,
    build_zeroshot_folder,
    classes_named,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo")


def test_rule_needs_enough_mentions_and_no_other_class():
    caps = {
        "only_dog.jpg": ["A dog on a couch.", "The puppy sleeps.", "a brown animal"],
        "dog_and_cat.jpg": ["A dog and a cat.", "dogs", "dog"],
        "one_mention.jpg": ["A pizza.", "food on a plate"],
        "second_dog.jpg": ["dogs playing", "two dogs"],
        "nothing.jpg": ["a street", "cars"],
    }
    assert assign_classes(caps, min_captions=2, min_images=1) == {"only_dog.jpg": "dog", "second_dog.jpg": "dog"}
    assert assign_classes(caps, min_captions=1, min_images=1)["one_mention.jpg"] == "pizza"
    assert assign_classes(caps, min_captions=2, min_images=3) == {}  # too few dogs for a class
    assert classes_named("hotdog stand") == set()  # whole words only


def test_folder_layout(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for name, word in [("a", "cat"), ("b", "cat"), ("c", "pizza"), ("d", "pizza"), ("e", "bus")]:
        draw("red", "circle", 16).save(images / f"{name}.jpg")
        rows += [
            {"file": f"{name}.jpg", "caption": f"a {word} here"},
            {"file": f"{name}.jpg", "caption": f"the {word}"},
        ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "captions.parquet")
    counts = build_zeroshot_folder(str(images), str(tmp_path / "captions.parquet"), str(tmp_path / "zs"))
    assert counts == {"cat": 2, "pizza": 2}
    assert sorted(os.listdir(tmp_path / "zs" / "cat")) == ["a.jpg", "b.jpg"]
    assert (tmp_path / "zs" / "classnames.txt").read_text() == "cat\npizza\n"


@pytest.mark.timeout(120)
def test_demo_training_step_reports_loss_and_top1(tmp_path):
    if not os.path.exists(os.path.join(DEMO, "captions.parquet")):
        pytest.skip("demo photos (demo/images, demo/captions.parquet) are not in this checkout")
    from wit_builder.train.demo_run import train_and_zero_shot

    old = torch.get_num_threads()
    try:
        manifest = write_captioned_photo_shards(
            os.path.join(DEMO, "images"), os.path.join(DEMO, "captions.parquet"), str(tmp_path / "shards")
        )
        got = train_and_zero_shot(
            manifest,
            str(tmp_path / "train"),
            os.path.join(DEMO, "images"),
            os.path.join(DEMO, "captions.parquet"),
            overrides=["steps=5", "data.workers=0"],
        )
    finally:
        torch.set_num_threads(old)
    assert got["steps"] == 5 and got["loss"] > 0 and 0.0 <= got["zeroshot_top1"] <= got["zeroshot_top5"] <= 1.0
    assert len(got["zeroshot_classes"]) >= 3 and os.path.isdir(got["checkpoint"])
