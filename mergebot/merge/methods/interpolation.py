"""Interpolation: linear (weighted average), SLERP (along the arc between two tensors) and passthrough."""

import math
from collections.abc import Iterator

import torch

from mergebot.merge.methods.base import BlockSource, TensorParams, model_weights

SLERP_COLINEAR = 0.9995
SLERP_EPS = 1e-8


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
    t = float(params.values["t"])
    dot = norm0 = norm1 = 0.0
    for _, (v0, v1) in blocks():
        flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
        dot += float(torch.dot(flat0, flat1))
        norm0 += float(torch.dot(flat0, flat0))
        norm1 += float(torch.dot(flat1, flat1))
    norm0, norm1 = math.sqrt(norm0), math.sqrt(norm1)
    cosine = dot / ((norm0 if norm0 > SLERP_EPS else 1.0) * (norm1 if norm1 > SLERP_EPS else 1.0))
    if abs(cosine) > SLERP_COLINEAR:
        scale0, scale1 = 1.0 - t, t
    else:
        theta = math.acos(cosine)
        scale0 = math.sin(theta - theta * t) / math.sin(theta)
        scale1 = math.sin(theta * t) / math.sin(theta)
    for _, (v0, v1) in blocks():
        yield torch.add(v0 * scale0, v1, alpha=scale1)


def passthrough(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    for _, (tensor,) in blocks():
        yield tensor
