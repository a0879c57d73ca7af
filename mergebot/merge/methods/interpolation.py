"""Interpolation: linear (weighted average), SLERP (along the arc between two tensors) and passthrough."""

from collections.abc import Iterator

import numpy as np
import torch

from mergebot.merge.methods.base import BlockSource, TensorParams, model_weights
from mergebot.merge.methods.shared import DOT_SPAN, in_order, slerp_scales


def linear(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    weights = model_weights(params)
    total = sum(weights) if params.values["normalize"] else 1.0
    scaled = [weight / total for weight in weights]
    for _, inputs in blocks():
        out = inputs[0] * scaled[0]
        for weight, tensor in zip(scaled[1:], inputs[1:], strict=True):
            out.add_(tensor, alpha=weight)
        yield out


def slerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    totals = np.zeros(3)
    for _, (v0, v1) in blocks():
        totals += in_order(span_dots(v0, v1))
    scale0, scale1 = slerp_scales(float(params.values["t"]), totals)
    for _, (v0, v1) in blocks():
        yield torch.add(v0 * scale0, v1, alpha=scale1)


def span_dots(v0: torch.Tensor, v1: torch.Tensor) -> np.ndarray:
    """v0·v1, v0·v0, v1·v1 of each DOT_SPAN elements of a block, float64 products added in element order."""
    a, b = (v.reshape(-1).to(torch.float64).numpy() for v in (v0, v1))
    padding = -a.size % DOT_SPAN
    products = np.stack([a * b, a * a, b * b])
    products = np.pad(products, ((0, 0), (0, padding))).reshape(3, -1, DOT_SPAN)
    return np.cumsum(products, axis=2)[:, :, -1].T


def passthrough(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    for _, (tensor,) in blocks():
        yield tensor
