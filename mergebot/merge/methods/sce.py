"""SCE (Select, Calculate, Erase; arXiv:2408.07990, mergekit's `sce`): keep the entries where the models' deltas vary
most (the top `select_topk` of the non-zero variances across models), weight each model by its mean squared delta,
and erase the deltas whose sign loses the TIES election. There is no per-model weight: the deltas give it."""

from collections.abc import Iterator

import numpy as np
import torch

from mergebot.merge.methods.base import BlockSource, TensorParams
from mergebot.merge.methods.entrywise import SCE_DIVISOR_MIN, sce_weights, span_squares
from mergebot.merge.methods.sparsify import TopKMask
from mergebot.merge.methods.task_arithmetic import majority_sign
from mergebot.merge.methods.topk import float_bits, top_cuts


def sce(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    select_topk = float(params.values["select_topk"])
    selecting = select_topk < 1.0
    cut = _variance_cut(blocks, select_topk) if selecting else None

    def selected_passes() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        fresh = cut.fresh() if cut else None
        for row_start, (base, *models) in blocks():
            deltas = [model - base for model in models]
            if selecting:
                keep = fresh.keep(row_start, _variance(deltas)) if fresh else torch.zeros(base.shape, dtype=torch.bool)
                deltas = [delta * keep for delta in deltas]
            yield base, deltas

    squares = np.zeros(len(params.per_model))
    numel = 0
    for base, deltas in selected_passes():
        numel += base.numel()
        squares += span_squares(torch.stack(deltas).numpy())
    weights = sce_weights([float(total) for total in squares], numel)
    for base, deltas in selected_passes():
        majority = majority_sign(deltas)
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights, strict=True):
            agreeing = (torch.sign(delta) == majority) * weight
            merged += delta * agreeing
            divisor += agreeing
        yield base + merged / divisor.clamp_(min=SCE_DIVISOR_MIN)


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the models, in float32 sums taken in model order (torch.var's own order
    depends on the machine; the fused loop takes this one)."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    mean = total / len(deltas)
    squares = None
    for delta in deltas:
        difference = delta - mean
        squares = difference * difference if squares is None else squares + difference * difference
    return squares / len(deltas)


def _variance_cut(blocks: BlockSource, select_topk: float) -> TopKMask | None:
    """The int(select_topk × non-zero count) entries of largest variance across the models (None: no entry)."""
    nonzero = 0
    wanted = 0

    def variance_bits() -> Iterator[list[torch.Tensor]]:
        nonlocal nonzero
        nonzero = 0
        for _, (base, *models) in blocks():
            variance = _variance([model - base for model in models])
            nonzero += int(torch.count_nonzero(variance))
            yield [float_bits(variance)]

    def choose_ks(numel: int) -> list[int]:
        nonlocal wanted
        wanted = int(nonzero * select_topk)
        return [max(1, wanted)]

    ((threshold, above, k),) = top_cuts(variance_bits, choose_ks)
    return TopKMask(threshold, k - above) if wanted > 0 else None
