"""Symmetric InfoNCE (CLIP) loss, local-loss formulation with features gathered WITH gradients.

Each rank scores its own rows against the features of every rank. The loss each rank returns
is scaled so that the mean over ranks (what DDP's gradient averaging computes) is the mean over
all valid rows of the global batch: gradients then equal the single-process result at the same
global batch. Padded rows (`valid` False) are neither anchors nor negatives.

Example:
    >>> import torch
    >>> f = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    >>> loss = clip_loss(f, f, torch.tensor(100.0), torch.ones(4, dtype=torch.bool), 4)
    >>> round(float(loss), 4)
    0.0
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        rank = dist.get_rank()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank (rank order), keeping the autograd path to each rank."""
    return _GatherWithGrad.apply(x) if distributed() else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor, valid_total: int
) -> torch.Tensor:
    """This rank's share of the global symmetric InfoNCE loss.

    image, text: (n, d) normalised features of this rank's rows; logit_scale: exp'd scale;
    valid: (n,) bool mask of real rows; valid_total: valid rows over all ranks. Returns
    world_size * (sum of this rank's valid row losses) / valid_total, so averaging over ranks
    gives the global mean loss.
    """
    image, text = image.float(), text.float()
    world = dist.get_world_size() if distributed() else 1
    rank = dist.get_rank() if distributed() else 0
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    all_valid = gather_no_grad(valid.to(torch.uint8)).bool()  # gloo has no bool all_gather
    n = image.shape[0]
    rows = torch.nonzero(valid, as_tuple=True)[0]
    labels = rows + rank * n
    per_image = logit_scale * image[rows] @ all_text.T
    per_text = logit_scale * text[rows] @ all_image.T
    pad = ~all_valid
    if bool(pad.any()):
        per_image = per_image.masked_fill(pad[None, :], float("-inf"))
        per_text = per_text.masked_fill(pad[None, :], float("-inf"))
    losses = F.cross_entropy(per_image, labels, reduction="sum") + F.cross_entropy(per_text, labels, reduction="sum")
    return losses * (world / (2.0 * max(valid_total, 1)))
