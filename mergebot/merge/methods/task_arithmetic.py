"""Task arithmetic and its sparsified, sign-elected relatives (TIES, DARE, Breadcrumbs, DELLA): base + lambda ×
combined deltas."""

from collections.abc import Callable, Iterator

import torch

from mergebot.merge.methods.base import BlockSource, TensorParams, model_weights
from mergebot.merge.methods.shared import DIVISOR_EPS
from mergebot.merge.methods.sparsify import make_pruners, rescale_factors


def make_task_arithmetic(sparsify: str | None, consensus: bool) -> Callable[..., Iterator[torch.Tensor]]:
    """Base + lambda × combined deltas; optionally sparsified (see `make_pruners`) and sign-elected (TIES)."""

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
        weights = model_weights(params)
        pruners = make_pruners(sparsify, blocks, params)
        scales = rescale_factors(blocks, pruners) if params.values.get("rescale") else [1.0] * len(pruners)
        normalize = bool(params.values["normalize"])
        lam = float(params.values["lambda"])
        for row_start, (base, *models) in blocks():
            weighted = []
            for model, weight, pruner, scale in zip(models, weights, pruners, scales, strict=True):
                delta = model - base
                if pruner is not None:
                    delta.mul_(pruner.keep(row_start, delta))
                    if scale != 1.0:
                        delta.mul_(scale)
                weighted.append(delta.mul_(weight))
            if consensus:
                mixed, divisor = _elect_signs(weighted, weights)
            else:
                mixed = torch.stack(weighted).sum(0) if len(weighted) > 1 else weighted[0]
                total = sum(weights)
                divisor = total if abs(total) >= DIVISOR_EPS else 1.0
            if normalize:
                mixed = mixed / divisor
            yield base + mixed * lam

    return merge


def majority_sign(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The sign of the summed deltas, +1 or −1 (a tie counts as +): the TIES election."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    return torch.where(total >= 0, 1.0, -1.0)


def _elect_signs(weighted: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: the sign of the summed weighted deltas wins (a tie counts as +); only deltas of that
    sign are summed, and the divisor is the sum of their models' weights (0 becomes 1). Zeros never agree."""
    sign = majority_sign(weighted)
    agreeing = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for delta, weight in zip(weighted, weights, strict=True):
        along = delta * sign
        divisor.add_(along > 0, alpha=weight)
        agreeing += along.clamp_(min=0.0)
    divisor[divisor == 0] = 1.0
    return agreeing.mul_(sign), divisor
