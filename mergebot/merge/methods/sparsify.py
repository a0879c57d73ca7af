"""Sparsifying a delta before it is combined: TIES keeps the largest magnitudes, DARE drops entries at random, Model
Breadcrumbs (arXiv:2312.06795) keeps a band below the largest outliers, and DELLA's MagPrune (arXiv:2406.11617) drops
at random with a keep probability that rises with the magnitude's rank in its row. Any of them may rescale what is
kept back to the delta's L1 norm (mergekit 0.1.5's `rescale`, DELLA's included)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from mergebot.merge.methods.base import BlockSource, TensorParams
from mergebot.merge.methods.shared import RESCALE_EPS, DrawGrid, magnitude_ks, outlier_ks
from mergebot.merge.methods.topk import float_bits, top_cuts


@dataclass
class TopKMask:
    """Keeps exactly k entries of largest magnitude; among equal magnitudes at the cut, the first in flat order.

    Blocks must come in row order: the count of equal entries still to keep carries from block to block."""

    threshold_bits: int
    keep_equal: int

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        magnitude_bits = float_bits(delta.abs())
        if self.keep_equal <= 0:
            return magnitude_bits > self.threshold_bits
        at_or_above = magnitude_bits >= self.threshold_bits
        equal = at_or_above & (magnitude_bits == self.threshold_bits)
        count = int(equal.sum())
        if count > self.keep_equal:
            flat_equal = equal.reshape(-1)
            beyond_quota = flat_equal & (torch.cumsum(flat_equal, 0) > self.keep_equal)
            at_or_above &= ~beyond_quota.reshape(equal.shape)
        self.keep_equal -= count
        return at_or_above

    def fresh(self) -> "TopKMask":
        return replace(self)


@dataclass
class BandMask:
    """Breadcrumbs: the `within` largest magnitudes minus the `above` largest (the same order as TopKMask, so the
    second set lies inside the first); None keeps nothing."""

    within: TopKMask | None
    above: TopKMask | None

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        if self.within is None:
            return torch.zeros(delta.shape, dtype=torch.bool)
        kept = self.within.keep(row_start, delta)
        if self.above is not None:
            kept &= ~self.above.keep(row_start, delta)
        return kept

    def fresh(self) -> "BandMask":
        return BandMask(*(mask.fresh() if mask else None for mask in (self.within, self.above)))


@dataclass(frozen=True)
class RandomMask(DrawGrid):
    """DARE's mask: keep where the grid's draw (torch.rand from the chunk's seeded generator) is below `density`."""

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        return self.uniform(row_start, delta.shape) < self.density

    def uniform(self, row_start: int, shape: torch.Size) -> torch.Tensor:
        """This model's uniform draws in [0, 1) for the rows row_start.. of the tensor."""
        rows, row_shape = (shape[0], shape[1:]) if len(shape) else (1, ())
        chunk_rows = self.chunk_rows(tuple(row_shape))
        first, last = row_start // chunk_rows, (row_start + rows - 1) // chunk_rows
        draws = torch.cat(
            [torch.rand((chunk_rows, *row_shape), generator=self._generator(c)) for c in range(first, last + 1)]
        )
        offset = row_start - first * chunk_rows
        return draws[offset : offset + rows].reshape(shape)

    def _generator(self, chunk: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.chunk_seed(chunk))

    def fresh(self) -> "RandomMask":
        return self


@dataclass(frozen=True)
class MagPruneMask:
    """DELLA MagPrune: DARE's draws (the same grid and seed), kept where below the entry's rank probability."""

    draws: RandomMask
    epsilon: float
    whole: torch.Tensor | None = None
    """A 1-D tensor is one row (as in mergekit): its probabilities, gathered over all its blocks."""

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        if self.whole is None:
            probabilities = rank_probabilities(delta, self.draws.density, self.epsilon)
        else:
            probabilities = self.whole[row_start : row_start + delta.shape[0]]
        return self.draws.uniform(row_start, delta.shape) < probabilities

    def fresh(self) -> "MagPruneMask":
        return self


def rank_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """density − ε + 2ε·r/(n − 1) for the entry of ascending magnitude rank r = 0..n−1 along dim 1 (its row);
    equal magnitudes rank in index order, and a row of one entry keeps `density` (mergekit divides 0 by 0)."""
    n = delta.shape[1]
    if n == 1:
        return torch.full(delta.shape, density)
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1, stable=True), dim=1)
    return (density - epsilon) + ranks.to(torch.float32) * (2 * epsilon / (n - 1))


def make_pruners(kind: str | None, blocks: BlockSource, params: TensorParams) -> list:
    """One pruner per model (None: its delta is kept whole): magnitude, random, outliers or magprune."""
    densities = [float(p.get("density", 1.0)) for p in params.per_model]
    if kind is None:
        return [None] * len(densities)
    if kind == "magnitude":
        return magnitude_masks(blocks, densities)
    if kind == "outliers":
        return outlier_masks(blocks, densities, [float(p["gamma"]) for p in params.per_model])
    draws = [
        RandomMask(density, int(params.values["seed"]), params.tensor_name, index) if density < 1.0 else None
        for index, density in enumerate(densities)
    ]
    if kind == "magprune":
        return magprune_masks(blocks, draws, [float(p["epsilon"]) for p in params.per_model])
    return draws


def magnitude_cuts(
    blocks: BlockSource, models: list[int], choose_ks: Callable[[int], list[int]]
) -> list[TopKMask | None]:
    """For each listed model (one may be listed twice), the mask of its k largest |delta|, k chosen from the element
    count; None for k = 0."""
    chosen: list[int] = []

    def magnitude_bits() -> Iterator[list[torch.Tensor]]:
        for _, (base, *inputs) in blocks():
            bits = {index: float_bits((inputs[index] - base).abs()) for index in set(models)}
            yield [bits[index] for index in models]

    def nonzero_ks(numel: int) -> list[int]:
        chosen[:] = choose_ks(numel)
        return [max(1, k) for k in chosen]

    cuts = top_cuts(magnitude_bits, nonzero_ks)
    return [
        TopKMask(threshold, k - above) if want > 0 else None
        for (threshold, above, k), want in zip(cuts, chosen, strict=True)
    ]


def magnitude_masks(blocks: BlockSource, densities: list[float]) -> list[TopKMask | None]:
    """TIES: the exact magnitude cut of each delta over the whole tensor, found by streaming."""
    sparse, choose_ks = magnitude_ks(densities)
    masks: list[TopKMask | None] = [None] * len(densities)
    if not sparse:
        return masks
    for index, mask in zip(sparse, magnitude_cuts(blocks, sparse, choose_ks), strict=True):
        masks[index] = mask
    return masks


def outlier_masks(blocks: BlockSource, densities: list[float], gammas: list[float]) -> list[BandMask | None]:
    """Breadcrumbs: drop the int(γ·n) largest magnitudes (fewer when int(density·n) would not fit below them), keep
    the next int(density·n), drop the rest; density 1 keeps everything (γ is then ignored, as in mergekit)."""
    sparse, choose_ks = outlier_ks(densities, gammas)
    masks: list[BandMask | None] = [None] * len(densities)
    if not sparse:
        return masks
    cuts = magnitude_cuts(blocks, [index for index in sparse for _ in range(2)], choose_ks)
    for number, index in enumerate(sparse):
        masks[index] = BandMask(cuts[2 * number], cuts[2 * number + 1])
    return masks


def magprune_masks(
    blocks: BlockSource, draws: list[RandomMask | None], epsilons: list[float]
) -> list[MagPruneMask | None]:
    """DELLA: rows rank themselves block by block; a 1-D tensor is gathered once (one vector) to rank it whole."""
    masks = [MagPruneMask(d, epsilon) if d else None for d, epsilon in zip(draws, epsilons, strict=True)]
    sparse = [index for index, mask in enumerate(masks) if mask is not None]
    parts: dict[int, list[torch.Tensor]] = {index: [] for index in sparse}
    for _, (base, *models) in blocks() if sparse else ():
        if base.dim() > 1:
            return masks
        for index in sparse:
            parts[index].append((models[index] - base).reshape(-1))
    for index in sparse:
        mask = masks[index]
        row = torch.cat(parts[index]).unsqueeze(0)
        whole = rank_probabilities(row, mask.draws.density, mask.epsilon).squeeze(0)
        masks[index] = replace(mask, whole=whole)
    return masks


def rescale_factors(blocks: BlockSource, pruners: list) -> list[float]:
    """The factor that gives each pruned delta back its L1 norm (1 where the norm is ~0). The norms add up in
    float64, so how the rows are blocked does not change the float32 factor."""
    factors = [1.0] * len(pruners)
    sparse = {index: pruner.fresh() for index, pruner in enumerate(pruners) if pruner is not None}
    before = dict.fromkeys(sparse, 0.0)
    after = dict.fromkeys(sparse, 0.0)
    for row_start, (base, *models) in blocks():
        for index, pruner in sparse.items():
            delta = models[index] - base
            before[index] += float(torch.linalg.vector_norm(delta, 1, dtype=torch.float64))
            kept = delta * pruner.keep(row_start, delta)
            after[index] += float(torch.linalg.vector_norm(kept, 1, dtype=torch.float64))
    for index in sparse:
        if before[index] >= RESCALE_EPS and after[index] >= RESCALE_EPS:
            factors[index] = before[index] / after[index]
    return factors
