"""What a method's torch definition and its fused loops (`fused`) both follow: constants, the choice of k, the
grid of random draws, the order of the slerp sums. Free of torch, so a merge whose tensors all take the fused loops
never imports it."""

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mergebot.merge.methods.base import TensorParams

RESCALE_EPS = 1e-7
DIVISOR_EPS = 1e-8
SLERP_COLINEAR = 0.9995
SLERP_EPS = 1e-8
RANDOM_CHUNK_ELEMENTS = 1 << 16
DOT_SPAN = 2048
"""The slerp angle's dot products add float64 products in element order, DOT_SPAN elements at a time from each
block's start, then those sums in order: one fixed order, so the angle is the same on every machine (torch.dot's
order depends on the thread count and the CPU). The fused loop (`kernels.dots`) adds in the same order."""


@dataclass(frozen=True)
class DrawGrid:
    """DARE's draws for one model's delta: keep each entry with probability `density`, drawn from a fixed grid of
    row chunks seeded by (seed, tensor, model, chunk), so the mask depends on the row, never on the blocking."""

    density: float
    seed: int
    tensor_name: str
    model_index: int

    def chunk_seed(self, chunk: int) -> int:
        key = f"{self.seed}:{self.tensor_name}:{self.model_index}:{chunk}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    @staticmethod
    def chunk_rows(row_shape: tuple[int, ...]) -> int:
        """Rows per chunk of draws: about RANDOM_CHUNK_ELEMENTS entries."""
        return max(1, RANDOM_CHUNK_ELEMENTS // max(1, math.prod(row_shape)))


def magnitude_ks(densities: list[float]) -> tuple[list[int], Callable[[int], list[int]]]:
    """The models TIES prunes, and how many entries each keeps of a tensor of n entries."""
    sparse = [index for index, density in enumerate(densities) if density < 1.0]

    def choose_ks(numel: int) -> list[int]:
        return [max(1, int(densities[index] * numel)) for index in sparse]

    return sparse, choose_ks


def outlier_ks(densities: list[float], gammas: list[float]) -> tuple[list[int], Callable[[int], list[int]]]:
    """The models Breadcrumbs prunes, and for each the two cuts of its band (the `within` largest, the `above`
    largest) in a tensor of n entries."""
    sparse = [index for index, density in enumerate(densities) if density < 1.0]

    def choose_ks(numel: int) -> list[int]:
        ks = []
        for index in sparse:
            target = int(densities[index] * numel)
            below = max(0, numel - target - int(gammas[index] * numel))
            ks += [max(0, numel - below), max(0, numel - below - target)]
        return ks

    return sparse, choose_ks


def histogram_pick(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    above = np.cumsum(histogram[::-1])[::-1] - histogram
    bucket = int(np.flatnonzero((above < k) & (above + histogram >= k))[0])
    return bucket, int(above[bucket])


def in_order(span_sums: np.ndarray) -> np.ndarray:
    """A block's sums from its spans' (one row each), added in order."""
    return np.cumsum(span_sums, axis=0)[-1]


def slerp_scales(t: float, totals: np.ndarray) -> tuple[float, float]:
    """The factors of v0 and v1 at t along the arc between them (along the chord when they are nearly colinear),
    from the tensors' dot product and squared norms."""
    dot, norm0, norm1 = float(totals[0]), math.sqrt(totals[1]), math.sqrt(totals[2])
    cosine = dot / ((norm0 if norm0 > SLERP_EPS else 1.0) * (norm1 if norm1 > SLERP_EPS else 1.0))
    if abs(cosine) > SLERP_COLINEAR:
        return 1.0 - t, t
    theta = math.acos(cosine)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def magprune_problem(params: TensorParams) -> str | None:
    """mergekit refuses an ε that puts density ± ε outside (0, 1) when anything is pruned."""
    for number, model in enumerate(params.per_model, 1):
        density, epsilon = float(model["density"]), float(model["epsilon"])
        if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
            return (
                f"parameters.epsilon: {epsilon} with density {density} (model {number}) puts density ± epsilon "
                f"outside (0, 1) for tensor {params.tensor_name}"
            )
    return None
