"""The CLIP loss and train step: 2 gloo ranks give the 1-process gradients at the same global batch,
feature-cached gradient accumulation gives the un-accumulated gradients, padded rows change nothing.

Tolerance for every gradient comparison: rtol 1e-4, atol 1e-6 (fp32; only the summation order
differs between the compared computations)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from wit_builder.train import model as tmodel
from wit_builder.train.config import ModelConfig
from wit_builder.train.loop import train_step
from wit_builder.train.loss import clip_loss

GLOBAL = 8
RTOL, ATOL = 1e-4, 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny():
    torch.manual_seed(0)
    return tmodel.build(ModelConfig(name="wit-test-tiny", arch=tmodel.TINY_ARCH)).model


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL, 3, 32, 32, generator=g)
    texts = torch.randint(1, 49407, (GLOBAL, 16), generator=g)
    return images, texts


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(valid: torch.Tensor) -> dict[str, torch.Tensor]:
    model = _tiny()
    images, texts = _batch()
    train_step(model, images, texts, valid, int(valid.sum()), 1, "fp32", torch.device("cpu"))
    return _grads(model)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, texts = _batch()
        rows = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
        for name, accum, valid in [
            ("plain", 1, torch.ones(GLOBAL, dtype=torch.bool)),
            ("padded_accum2", 2, torch.tensor([1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)),
        ]:
            model = torch.nn.parallel.DistributedDataParallel(_tiny())
            train_step(
                model, images[rows], texts[rows], valid[rows], int(valid.sum()), accum, "fp32", torch.device("cpu")
            )
            torch.save(_grads(model.module), os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_gloo_ranks_give_single_process_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    plain = _reference(torch.ones(GLOBAL, dtype=torch.bool))
    padded = _reference(torch.tensor([1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool))
    for rank in range(2):
        _assert_same(torch.load(tmp_path / f"plain_{rank}.pt"), plain)
        _assert_same(torch.load(tmp_path / f"padded_accum2_{rank}.pt"), padded)
    # the comparison is not vacuous: masking rows changes the gradient
    assert not torch.allclose(plain["logit_scale"], padded["logit_scale"], rtol=RTOL, atol=ATOL)


def test_accumulation_matches_full_batch():
    valid = torch.ones(GLOBAL, dtype=torch.bool)
    ref = _reference(valid)
    model = _tiny()
    images, texts = _batch()
    train_step(model, images, texts, valid, GLOBAL, 4, "fp32", torch.device("cpu"))
    _assert_same(_grads(model), ref)


def test_padded_rows_are_neither_anchors_nor_negatives():
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    padded = _reference(valid)
    model = _tiny()
    images, texts = _batch()
    keep = valid.nonzero().squeeze(1)
    train_step(
        model,
        images[keep],
        texts[keep],
        torch.ones(len(keep), dtype=torch.bool),
        len(keep),
        1,
        "fp32",
        torch.device("cpu"),
    )
    _assert_same(_grads(model), padded)


def test_loss_equals_direct_formula():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    logits = scale * img @ txt.T
    expected = 0
    for i in range(6):  # the textbook symmetric InfoNCE, row by row
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    expected /= 12
    got = clip_loss(img, txt, scale, torch.ones(6, dtype=torch.bool), 6)
    torch.testing.assert_close(got, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    valid = torch.ones(GLOBAL, dtype=torch.bool)
    ref = _reference(valid)
    model = _tiny()
    model.set_grad_checkpointing(True)
    images, texts = _batch()
    train_step(model, images, texts, valid, GLOBAL, 2, "fp32", torch.device("cpu"))
    _assert_same(_grads(model), ref)
