"""RAM (Reinforced Agent Merging, arXiv:2601.13572; mergekit's `ram` and `ramplus_tl`): an entry that only one model
changes (|delta| > epsilon) takes that model's delta whole, an entry several change takes the mean of their deltas,
so what one model alone learned is not diluted by the others. RAM+ (tensor-local) also scales each model's unique
entries by 1 + r·clamp(shared / unique, 0, alpha), counted over the tensor, favouring models that share more."""

from collections.abc import Iterator

import torch

from mergebot.merge.methods.base import BlockSource, TensorParams
from mergebot.merge.methods.entrywise import ramplus_scales


def ram(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    epsilon = float(params.values["epsilon"])
    for _, (base, *models) in blocks():
        yield _combine(base, models, epsilon, [1.0] * len(models))


def ramplus_tl(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    epsilon, r, alpha = (float(params.values[name]) for name in ("epsilon", "r", "alpha"))
    shared = [0] * len(params.per_model)
    unique = [0] * len(params.per_model)
    for _, (base, *models) in blocks():
        changed = [(model - base).abs() > epsilon for model in models]
        count = _count(changed)
        for index, mask in enumerate(changed):
            shared[index] += int((mask & (count > 1)).sum())
            unique[index] += int((mask & (count == 1)).sum())
    scales = ramplus_scales(shared, unique, epsilon, r, alpha)
    for _, (base, *models) in blocks():
        yield _combine(base, models, epsilon, scales)


def _count(changed: list[torch.Tensor]) -> torch.Tensor:
    count = changed[0].to(torch.int64)
    for mask in changed[1:]:
        count += mask
    return count


def _combine(base: torch.Tensor, models: list[torch.Tensor], epsilon: float, scales: list[float]) -> torch.Tensor:
    """base + Σ over models of the delta where it changes: × its scale where unique, ÷ the count where shared."""
    deltas = [model - base for model in models]
    changed = [delta.abs() > epsilon for delta in deltas]
    count = _count(changed)
    overlap = count > 1
    merged = torch.zeros_like(base)
    for delta, mask, scale in zip(deltas, changed, scales, strict=True):
        kept = delta * mask
        merged += torch.where(overlap, kept / count.clamp(min=1), kept * scale)
    return base + merged
