"""A base and one model, combined entry by entry: NearSwap takes the model where it is near the base, Arcee Fusion
where its change matters most (mergekit's definitions)."""

from collections.abc import Iterator

import torch

from mergebot.merge.methods.base import BlockSource, TensorParams
from mergebot.merge.methods.entrywise import NEARSWAP_MIN_DISTANCE
from mergebot.merge.methods.gram import regrid
from mergebot.merge.methods.topk import top_cuts

FUSION_EPS = 1e-8
SIGN_FLIP = 1 << 31


def nearswap(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """NearSwap (alchemonaut, QuartetAnemoi-70B-t0.0001): each entry moves towards the model by
    min(1, t / |base − model|) (the distance floored at 1e-6), so entries closer than t take the model's value and
    distant ones stay near the base. mergekit divides through a float32 reciprocal; here the division is exact."""
    t = torch.tensor(float(params.values["t"]), dtype=torch.float32)
    for _, (base, model) in blocks():
        weight = torch.div(t, (base - model).abs().clamp(min=NEARSWAP_MIN_DISTANCE)).clamp(0.0, 1.0)
        yield weight * model + (1 - weight) * base


def arcee_fusion(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    """Arcee Fusion (arcee.ai): the model's value where its importance, |model − base| times the KL divergence of the
    model's softmax from the base's along the last dim, is at least median + 1.5·IQR over the tensor; else the base.

    The quartiles are the exact order statistics at floor(q·(n−1)), found by streaming (`top_cuts`). mergekit sorts
    a random sample of a million entries for larger tensors, so its result there changes from run to run; below that
    both agree. mergekit adds the masked delta back (base + Δ·mask, one rounding); here a kept entry is the model's."""
    source = _whole_if_vector(regrid(blocks))

    def keys() -> Iterator[list[torch.Tensor]]:
        for _, (base, model) in source():
            key = _order_key(_importance(base, model))
            yield [key, key, key]

    def choose_ks(numel: int) -> list[int]:
        return [numel - (numel - 1) // 4, numel - (numel - 1) // 2, numel - 3 * (numel - 1) // 4]

    low, median, high = (_from_order_key(threshold) for threshold, _, _ in top_cuts(keys, choose_ks))
    threshold = median + 1.5 * (high - low)
    for _, (base, model) in source():
        yield torch.where(_importance(base, model) >= threshold, model, base)


def _importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(model, dim=-1) + FUSION_EPS
    q = torch.softmax(base, dim=-1) + FUSION_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * divergence


def _whole_if_vector(blocks: BlockSource) -> BlockSource:
    """The softmax runs along the last dim, which for a 1-D tensor is all of it: such a tensor becomes one block."""
    passes = iter(blocks())
    _, first = next(passes)
    if first[0].dim() != 1:
        return blocks
    whole = [torch.cat(column) for column in zip(first, *(inputs for _, inputs in passes), strict=True)]
    return lambda: iter([(0, whole)])


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 keys < 2³² in the order of the float32 values, negatives included (for `top_cuts`)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + SIGN_FLIP, -1 - bits)


def _from_order_key(key: int) -> torch.Tensor:
    bits = key - SIGN_FLIP if key >= SIGN_FLIP else -1 - key
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)
