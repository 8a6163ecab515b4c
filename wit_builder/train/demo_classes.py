"""A small labelled image folder for the demo's zero-shot step, built from captioned photos.

The rule: a photo belongs to class c iff at least `min_captions` of its captions name c (a word of
c's word list, whole-word, case-insensitive) and none of its captions names any other class.
Classes with fewer than `min_images` photos are left out. The folder gets one sub-folder per
class (photos copied, names kept) and `classnames.txt` (one name per line, sorted-folder order),
ready for `wit_builder.train.eval.zero_shot`.

    $ python -m wit_builder.train.demo_classes demo/images demo/captions.parquet runs/demo/zeroshot

Example:
    >>> caps = {"a.jpg": ["A dog on a couch", "dog sleeping"], "b.jpg": ["a cat and a dog"],
    ...         "c.jpg": ["Two cats", "a kitten"], "d.jpg": ["a dog", "puppies playing"]}
    >>> assign_classes(caps, min_captions=2, min_images=1)
    {'a.jpg': 'dog', 'c.jpg': 'cat', 'd.jpg': 'dog'}
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter, defaultdict

# class name -> the words that name it in a caption (whole words, lower case)
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "airplanes", "plane", "planes", "jet", "jets", "aircraft"),
    "bird": ("bird", "birds"),
    "bus": ("bus", "buses", "busses"),
    "cake": ("cake", "cakes"),
    "cat": ("cat", "cats", "kitten", "kittens"),
    "dog": ("dog", "dogs", "puppy", "puppies"),
    "giraffe": ("giraffe", "giraffes"),
    "horse": ("horse", "horses"),
    "laptop": ("laptop", "laptops"),
    "pizza": ("pizza", "pizzas"),
    "skateboard": ("skateboard", "skateboards", "skateboarder", "skateboarding"),
    "tennis racket": ("tennis",),
    "toilet": ("toilet", "toilets"),
    "train": ("train", "trains"),
    "zebra": ("zebra", "zebras"),
}

_WORD = re.compile(r"[a-z]+")


def classes_named(caption: str) -> set[str]:
    """The classes a caption names.

    >>> sorted(classes_named("Two Dogs chase a cat-shaped kite"))
    ['cat', 'dog']
    """
    words = set(_WORD.findall(caption.lower()))
    return {c for c, names in CLASS_WORDS.items() if words.intersection(names)}


def assign_classes(captions: dict[str, list[str]], min_captions: int = 2, min_images: int = 2) -> dict[str, str]:
    """file -> class per the rule in the module docstring."""
    chosen: dict[str, str] = {}
    for file, caps in sorted(captions.items()):
        named = [classes_named(c) for c in caps]
        every = set().union(*named) if named else set()
        if len(every) != 1:
            continue
        (c,) = every
        if sum(c in n for n in named) >= min_captions:
            chosen[file] = c
    counts = Counter(chosen.values())
    return {f: c for f, c in chosen.items() if counts[c] >= min_images}


def read_captions(path: str) -> dict[str, list[str]]:
    """file -> captions from a parquet with columns `file`, `caption`."""
    import pyarrow.parquet as pq

    caps: dict[str, list[str]] = defaultdict(list)
    for row in pq.read_table(path, columns=["file", "caption"]).to_pylist():
        caps[row["file"]].append(row["caption"] or "")
    return dict(caps)


def build_zeroshot_folder(
    images_dir: str, captions_parquet: str, out_dir: str, min_captions: int = 2, min_images: int = 2
) -> dict[str, int]:
    """Write the labelled folder + classnames.txt into `out_dir`; returns images per class."""
    assigned = assign_classes(read_captions(captions_parquet), min_captions, min_images)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    for file, c in assigned.items():
        folder = os.path.join(out_dir, c.replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(os.path.join(images_dir, file), os.path.join(folder, file))
    classes = sorted({c for c in assigned.values()}, key=lambda c: c.replace(" ", "_"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "classnames.txt"), "w") as f:
        f.write("".join(c + "\n" for c in classes))
    return dict(sorted(Counter(assigned.values()).items()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m wit_builder.train.demo_classes IMAGES_DIR CAPTIONS_PARQUET OUT_DIR", file=sys.stderr)
        return 2
    counts = build_zeroshot_folder(*args)
    print(f"{sum(counts.values())} images in {len(counts)} classes: {counts} -> {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
