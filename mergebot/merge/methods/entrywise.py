"""What the entry-by-entry methods' torch definitions (`ram`, `sce`, `fusion`) and their fused loops
(`fused_entrywise`) both follow: constants, the per-model factors drawn from a tensor's counts and sums, and the
order of those sums. Free of torch, so a merge on the fused loops never imports it."""

import numpy as np

from mergebot.merge.methods.shared import DOT_SPAN, in_order

NEARSWAP_MIN_DISTANCE = 1e-6
LANES = 8
"""Side-by-side sums of SCE's squared deltas (`span_squares`)."""
SCE_WEIGHT_SUM_EPS = 1e-6
"""mergekit: mean squared deltas summing below this give every model the same weight."""
SCE_DIVISOR_MIN = 1e-6
"""mergekit: the sum of the agreeing weights is clamped to at least this (0 where nothing agrees)."""


def ramplus_scales(shared: list[int], unique: list[int], epsilon: float, r: float, alpha: float) -> list[float]:
    """RAM+: each model's unique entries scaled by 1 + r·clamp(shared / unique, 0, alpha)."""
    scales = []
    for shared_count, unique_count in zip(shared, unique, strict=True):
        # mergekit divides by max(unique, epsilon); with no unique entry the scale is never used, so 0/0 is skipped
        divisor = max(unique_count, epsilon)
        rho = shared_count / divisor if divisor > 0 else 0.0
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))
    return scales


def span_squares(deltas: np.ndarray) -> np.ndarray:
    """Σ d² of each delta [models, entries] (float32) in float64 (exact squares), in one fixed order: in each
    DOT_SPAN entries from the block's start, LANES sums side by side (entry i into sum i mod LANES, in entry order),
    those added in order, then the spans' sums in order. The fused loop takes the same order on any machine, and
    its sums vectorize."""
    wide = deltas.reshape(len(deltas), -1).astype(np.float64)
    padding = -wide.shape[1] % DOT_SPAN
    squares = np.pad(wide * wide, ((0, 0), (0, padding))).reshape(len(deltas), -1, DOT_SPAN // LANES, LANES)
    lanes = np.cumsum(squares, axis=2)[:, :, -1]
    return in_order(np.cumsum(lanes, axis=2)[:, :, -1].T)


def sce_weights(squares: list[float], numel: int) -> list[float]:
    """Each model's mean squared (selected) delta over the sum of them (equal weights when that is ~0)."""
    means = [total / max(1, numel) for total in squares]
    total = sum(means)
    return [1.0 / len(means)] * len(means) if abs(total) < SCE_WEIGHT_SUM_EPS else [m / total for m in means]
