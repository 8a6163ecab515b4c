"""Training data: the shards manifest, split at SAMPLE level over ranks x workers, resumable.

Every sample belongs to exactly one slot, `blake2b(key) mod (world_size * workers)`, so even a
single shard feeds every rank and an epoch sees each sample exactly once across all ranks. Each
slot reads every tar of the manifest but only the tar *headers* of other slots' samples (their
data is seeked over), shuffles its own raw samples with a buffer seeded by (seed, epoch, slot),
numbers them, and decodes + augments them in its DataLoader worker. The main process re-batches
the workers' rows into exact per-rank batches and records, per worker, how many of its numbered
samples went into a batch that was trained on, and which worker's rows come next: that is the
data position a checkpoint stores. A resumed run regenerates the same per-slot streams and skips
the consumed prefix before decoding, so it neither repeats nor skips a sample; and it rebuilds
the very same batches: a worker cuts its chunks at fixed sample numbers (multiples of `chunk`,
not counted from where it started), the DataLoader's round-robin over workers starts at the
worker that was next, and each sample's augmentation is seeded by (seed, epoch, key).

Tars follow the webdataset layout (`{key}.jpg`, `{key}.txt`, `{key}.json`, members of one
sample adjacent); a sample that cannot be decoded is skipped with a warning (webdataset's
warn-and-continue policy for samples); a bad manifest or a missing tar raises `DataError`.

Example:
    >>> slot_of("0123456789abcdef", 4) in range(4)
    True
    >>> is_heldout("0123456789abcdef", 0.0)
    False
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from wit_builder import io as wio
from wit_builder import tario
from wit_builder.config import ConfigError

log = logging.getLogger("wit_builder.train")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class DataError(ConfigError):
    """A bad manifest or a missing/unreadable shard: printed without a traceback, exit code 2."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: str
    shards: list[Shard]
    total_samples: int
    info: dict[str, Any] = field(default_factory=dict)


def _fs(path: str):
    from wit_builder import io as wio

    return wio.filesystem(path)


def load_manifest(path: str, verify_sha256: bool = False) -> Manifest:
    """Read and check `shards/manifest.json`: fields present, every tar exists with its size.

    Raises DataError with a message naming the problem (never a raw traceback)."""
    try:
        fs, inner = _fs(path)
        with fs.open(inner, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"manifest {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read manifest {path}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tars"), list):
        raise DataError(f"manifest {path}: expected an object with a 'tars' list")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    shards = []
    for i, entry in enumerate(raw["tars"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DataError(f"manifest {path}: tars[{i}] has no 'path'")
        for key in ("samples", "bytes"):
            if not isinstance(entry.get(key), int) or entry[key] < 0:
                raise DataError(f"manifest {path}: tars[{i}] ({entry['path']}) has no valid {key!r}")
        rel = entry["path"]
        url = rel if ("://" in rel or os.path.isabs(rel)) else f"{base}/{rel}"
        shards.append(Shard(url, entry["samples"], entry["bytes"], str(entry.get("sha256", ""))))
    if not shards:
        raise DataError(f"manifest {path}: lists no tars")
    for shard in shards:
        sfs, sinner = _fs(shard.url)
        if not sfs.exists(sinner):
            raise DataError(f"shard {shard.url} listed in manifest {path} not found")
        size = sfs.size(sinner)
        if size != shard.bytes:
            raise DataError(f"shard {shard.url}: {size} bytes on disk, manifest says {shard.bytes}")
        if verify_sha256 and shard.sha256:
            h = hashlib.sha256()
            with sfs.open(sinner, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != shard.sha256:
                raise DataError(f"shard {shard.url}: sha256 differs from the manifest")
    total = sum(s.samples for s in shards)
    declared = raw.get("total_samples", total)
    if declared != total:
        raise DataError(f"manifest {path}: total_samples {declared} != sum over tars {total}")
    return Manifest(path, shards, total, {k: v for k, v in raw.items() if k != "tars"})


def _key_hash(key: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.blake2b((salt + key).encode(), digest_size=8).digest(), "big")


def slot_of(key: str, slots: int) -> int:
    """The (rank, worker) slot a sample key belongs to: rank * workers + worker."""
    return _key_hash(key) % slots


def is_heldout(key: str, fraction: float) -> bool:
    """True for the `fraction` of keys (by hash) kept out of training for retrieval eval."""
    return fraction > 0 and (_key_hash(key, "holdout\x1f") % 1_000_000) < fraction * 1_000_000


def _sample_key(name: str) -> tuple[str, str]:
    """`dir/abc.jpg` -> ("dir/abc", "jpg") as webdataset groups members (before the first dot)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def iter_tar(url: str, want: Callable[[str], bool]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for the samples of one tar whose key passes `want`; the data of
    other samples is seeked over, not read (tario's header scan, ~10 us a member). A damaged
    shard yields its readable samples and a warning."""
    fs, inner = _fs(url)
    try:
        f = fs.open(inner, "rb")
    except FileNotFoundError:
        raise DataError(f"shard {url} not found") from None
    key, parts, wanted = None, {}, False
    with f:
        members = tario.iter_members(f)
        try:
            while True:
                try:
                    name, _offset, _size, read = next(members)
                except StopIteration as stop:
                    if not stop.value:
                        log.warning("shard %s: no end-of-archive marker (truncated?); rest of shard skipped", url)
                    break
                k, ext = _sample_key(name)
                if k != key:
                    if key is not None and parts:
                        yield key, parts
                    key, parts, wanted = k, {}, want(k)
                if wanted:
                    parts[ext] = read()
        except (tario.TarFormatError, OSError, ValueError) as e:
            # members already in `parts` were read whole; an incomplete sample fails decoding later
            log.warning("shard %s: unreadable after %s (%s); rest of shard skipped", url, key, e)
    if key is not None and parts:
        yield key, parts


def _rng(*parts: Any) -> random.Random:
    return random.Random(_key_hash("\x1f".join(str(p) for p in parts)))


def slot_stream(
    urls: list[str], slot: int, slots: int, epoch: int, seed: int, buffer: int, holdout: float
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The raw, shuffled, deterministic sample stream of one slot for one epoch."""
    order = list(urls)
    _rng(seed, epoch, "shards").shuffle(order)
    rng = _rng(seed, epoch, slot, "buffer")
    want = lambda k: slot_of(k, slots) == slot and not is_heldout(k, holdout)  # noqa: E731
    pool: list[tuple[str, dict[str, bytes]]] = []
    for url in order:
        for item in iter_tar(url, want):
            if len(pool) < buffer:
                pool.append(item)
                continue
            i = rng.randrange(len(pool))
            pool[i], item = item, pool[i]
            yield item
    rng.shuffle(pool)
    yield from pool


def decode_sample(parts: dict[str, bytes], transform: Callable) -> tuple[Any, str]:
    """(image tensor, caption) from a sample's raw members; raises ValueError when unusable.
    Captions are tokenized a chunk at a time (one tokenizer call per chunk, not per sample)."""
    from PIL import Image

    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None or "txt" not in parts:
        raise ValueError(f"sample lacks an image or a caption (has {sorted(parts)})")
    caption = parts["txt"].decode("utf-8")
    with Image.open(io.BytesIO(parts[img_ext])) as im:
        image = transform(im.convert("RGB"))
    return image, caption


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: the main process handles both (it finishes
    the step, checkpoints, then shuts its workers down). A terminal's Ctrl-C, `kill -TERM -PGID` and
    torchrun (which signals each rank's whole process group) reach the workers too; dying there
    would kill the rank with "DataLoader worker ... is killed by signal" before it saves. A worker
    whose main process is gone exits by itself (DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class EpochSpec:
    """Everything a worker needs to rebuild its stream for one epoch of one rank."""

    urls: list[str]
    rank: int
    world: int
    workers: int  # slots per rank (>= 1)
    epoch: int
    seed: int
    buffer: int
    holdout: float
    chunk: int  # a worker's chunks end after sample numbers chunk-1, 2*chunk-1, ... of its stream
    start: list[int]  # per worker: numbered samples already consumed (skipped, not decoded)
    first_worker: int = 0  # the worker whose rows come first (a resumed epoch's round-robin)


class SlotDataset(torch.utils.data.IterableDataset):
    """The chunks of one DataLoader worker: its slot's stream, decoded + augmented + tokenized.
    At module level so that a forkserver/spawn worker can unpickle it (see `worker_context`)."""

    def __init__(self, spec: EpochSpec, transform: Callable, tokenizer: Callable) -> None:
        self.spec, self.transform, self.tokenizer = spec, transform, tokenizer

    def __iter__(self):
        spec, transform, tokenizer = self.spec, self.transform, self.tokenizer
        info = torch.utils.data.get_worker_info()
        # DataLoader worker i (the i-th of its round-robin) serves worker w of this rank
        w = ((info.id if info is not None else 0) + spec.first_worker) % spec.workers
        slot = spec.rank * spec.workers + w
        images, captions, keys, seqs, bad = [], [], [], [], 0
        stream = slot_stream(
            spec.urls, slot, spec.world * spec.workers, spec.epoch, spec.seed, spec.buffer, spec.holdout
        )
        for seq, (key, parts) in enumerate(stream):
            if seq < spec.start[w]:
                continue
            # the augmentation of a sample depends on nothing but (seed, epoch, key)
            torch.default_generator.manual_seed(_key_hash(key, f"{spec.seed}\x1f{spec.epoch}\x1f") % (1 << 62))
            try:
                image, caption = decode_sample(parts, transform)
                images.append(image), captions.append(caption), keys.append(key), seqs.append(seq)
            except Exception as e:  # warn-and-continue for a bad sample
                bad += 1
                if bad <= 5:
                    log.warning("sample %s skipped: %s", key, e)
            if keys and (seq + 1) % spec.chunk == 0:
                yield _chunk(images, tokenizer(captions), keys, seqs, w)
                images, captions, keys, seqs = [], [], [], []
        if keys:
            yield _chunk(images, tokenizer(captions), keys, seqs, w)


def worker_context(urls: list[str]) -> str | None:
    """How DataLoader workers start: forked (the default, fastest) when every shard is a local
    file; from a forkserver when any is on an object store. A forked child inherits the parent's
    object-store client (fsspec's event-loop thread, open sockets, OpenSSL state) mid-flight,
    and in CI that crashed a worker (segfault) reading shards from S3.

    Example:
        >>> worker_context(["/data/shards/00000.tar"]) is None
        True
        >>> worker_context(["s3://bucket/shards/00000.tar"])
        'forkserver'
    """
    return None if all(wio.is_local(u) for u in urls) else "forkserver"


def _chunk(images, tokens, keys, seqs, worker):

    return {"image": torch.stack(images), "text": tokens, "key": list(keys), "seq": list(seqs), "worker": worker}


@dataclass
class LocalBatch:
    image: Any  # (n, 3, H, W) float tensor
    text: Any  # (n, context) long tensor
    keys: list[str]
    positions: list[int]  # per worker, after this batch (what a checkpoint stores)
    next_worker: int = 0  # the worker whose rows come next (what a checkpoint stores)

    @property
    def rows(self) -> int:
        return len(self.keys)


def epoch_batches(
    spec: EpochSpec,
    transform: Callable,
    tokenizer: Callable,
    local_batch: int,
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[LocalBatch]:
    """Exact `local_batch`-row batches for this rank and epoch (the last one may be shorter),
    each with the data position after it (per-worker positions, the next worker)."""

    dataset = SlotDataset(spec, transform, tokenizer)
    loader = torch.utils.data.DataLoader(
        dataset,
        multiprocessing_context=worker_context(spec.urls) if num_workers else None,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    positions = list(spec.start)
    pending: list[dict] = []  # chunks with rows not yet batched
    offset = 0  # rows of pending[0] already used
    have = 0
    for chunk in loader:
        pending.append(chunk)
        have += len(chunk["key"])
        while have >= local_batch:
            batch, offset = _take(pending, offset, local_batch, positions, spec.workers)
            have -= local_batch
            yield batch
    if have:
        batch, offset = _take(pending, offset, have, positions, spec.workers)
        yield batch


def _take(pending: list[dict], offset: int, n: int, positions: list[int], workers: int) -> tuple[LocalBatch, int]:
    images, texts, keys = [], [], []
    while n:
        c = pending[0]
        size = len(c["key"])
        k = min(n, size - offset)
        images.append(c["image"][offset : offset + k])
        texts.append(c["text"][offset : offset + k])
        keys += c["key"][offset : offset + k]
        positions[c["worker"]] = c["seq"][offset + k - 1] + 1
        n -= k
        offset += k
        if offset == size:
            pending.pop(0)
            offset = 0
    # next: the worker of the first chunk not used up, else the one after the last chunk used
    nxt = pending[0]["worker"] if pending else (c["worker"] + 1) % workers
    return LocalBatch(torch.cat(images), torch.cat(texts), keys, list(positions), nxt), offset


def iter_samples(manifest: Manifest, heldout: float | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of the manifest in tar order, or (heldout = the holdout fraction) only the
    samples `is_heldout` keeps out of training."""
    want = (lambda k: True) if heldout is None else (lambda k: is_heldout(k, heldout))  # noqa: E731
    for shard in manifest.shards:
        yield from iter_tar(shard.url, want)
