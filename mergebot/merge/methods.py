"""Merge methods: pure functions on float32 tensors, no I/O.

The engine hands each method one output tensor as a re-iterable source of row blocks (every block a list of float32
tensors, the base model first when the method uses one). A method may walk the blocks more than once to gather an
exact whole-tensor statistic (a slerp angle, a TIES magnitude threshold, a DARE L1 norm) and then yields the output
blocks in order. So a large embedding never needs float32 copies of every input at once, and the numbers still
equal the published whole-tensor formulas (mergekit's definitions are the reference).
"""

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any

import torch

from mergebot.errors import ConfigError

Block = list[torch.Tensor]
BlockSource = Callable[[], Iterable[tuple[int, Block]]]
"""Calling it starts a fresh pass: (first row of the block, the inputs' rows) in row order, same blocks each pass."""


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one output tensor (gradients and filters already applied)."""

    tensor_name: str
    values: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    """One mapping per non-base input, in input order."""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and the parameters it accepts (with defaults; `None` means required)."""

    name: str
    merge: Callable[[BlockSource, TensorParams], Iterator[torch.Tensor]]
    uses_base: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None


SLERP_COLINEAR = 0.9995
SLERP_EPS = 1e-8
RESCALE_EPS = 1e-7
RANDOM_CHUNK_ELEMENTS = 1 << 16
DIVISOR_EPS = 1e-8


def _weights(params: TensorParams) -> list[float]:
    return [float(p["weight"]) for p in params.per_model]


def _linear(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    weights = _weights(params)
    total = sum(weights) if params.values["normalize"] else 1.0
    scaled = [weight / total for weight in weights]
    for _, inputs in blocks():
        out = inputs[0] * scaled[0]
        for weight, tensor in zip(scaled[1:], inputs[1:], strict=True):
            out.add_(tensor, alpha=weight)
        yield out


def _slerp(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
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


def _passthrough(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
    for _, (tensor,) in blocks():
        yield tensor


def _float_bits(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns of non-negative float32 values, whose integer order is the values' order."""
    return values.contiguous().view(torch.int32)


@dataclass
class _TopKMask:
    """Keeps exactly k entries of largest magnitude; among equal magnitudes at the cut, the first in flat order.

    Blocks must come in row order: the count of equal entries still to keep carries from block to block."""

    threshold_bits: int
    keep_equal: int

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        magnitude_bits = _float_bits(delta.abs())
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

    def fresh(self) -> "_TopKMask":
        return replace(self)


@dataclass(frozen=True)
class _RandomMask:
    """DARE: keep each entry with probability `density`, drawn from a fixed grid of row chunks seeded by
    (seed, tensor, model, chunk), so the mask depends on the row, never on how the rows were blocked."""

    density: float
    seed: int
    tensor_name: str
    model_index: int

    def keep(self, row_start: int, delta: torch.Tensor) -> torch.Tensor:
        rows, row_shape = (delta.shape[0], delta.shape[1:]) if delta.dim() else (1, ())
        chunk_rows = max(1, RANDOM_CHUNK_ELEMENTS // max(1, math.prod(row_shape)))
        first, last = row_start // chunk_rows, (row_start + rows - 1) // chunk_rows
        draws = torch.cat(
            [torch.rand((chunk_rows, *row_shape), generator=self._generator(c)) for c in range(first, last + 1)]
        )
        offset = row_start - first * chunk_rows
        return (draws[offset : offset + rows] < self.density).reshape(delta.shape)

    def _generator(self, chunk: int) -> torch.Generator:
        key = f"{self.seed}:{self.tensor_name}:{self.model_index}:{chunk}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def fresh(self) -> "_RandomMask":
        return self


def _histogram_pick(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    above = torch.flip(torch.cumsum(torch.flip(histogram, [0]), 0), [0]) - histogram
    bucket = int(torch.nonzero((above < k) & (above + histogram >= k))[0])
    return bucket, int(above[bucket])


def kth_largest_bits(streams: Callable[[], Iterable[list[torch.Tensor]]], ks: list[int]) -> list[tuple[int, int]]:
    """Exact k-th largest of several streams of non-negative float32 bit patterns, in two histogram passes.

    Each pass walks all streams side by side. Returns, per stream, (threshold bits, entries strictly above it).
    """
    return [(threshold, above) for threshold, above, _ in _top_cuts(streams, lambda numel: ks)]


def _top_cuts(
    streams: Callable[[], Iterable[list[torch.Tensor]]], choose_ks: Callable[[int], list[int]]
) -> list[tuple[int, int, int]]:
    """(threshold bits, entries above it, k) per stream, with k chosen once the element count is known.

    A histogram of the high 16 bits finds the bucket of the k-th largest, a second pass over that bucket's low 16
    bits finds the exact value (faster than sorting even when the tensor is one block)."""
    buckets = 1 << 16
    high: torch.Tensor | None = None
    for bits in streams():
        if high is None:
            high = torch.zeros(len(bits), buckets, dtype=torch.int64)
        for index, stream_bits in enumerate(bits):
            high[index] += torch.bincount((stream_bits >> 16).reshape(-1), minlength=buckets)
    assert high is not None
    ks = choose_ks(int(high[0].sum()))
    picks = [_histogram_pick(high[index], k) for index, k in enumerate(ks)]
    low = torch.zeros(len(ks), buckets, dtype=torch.int64)
    for bits in streams():
        for index, stream_bits in enumerate(bits):
            in_bucket = stream_bits[(stream_bits >> 16) == picks[index][0]]
            low[index] += torch.bincount(in_bucket & 0xFFFF, minlength=buckets)
    results = []
    for index, (k, (bucket, above_bucket)) in enumerate(zip(ks, picks, strict=True)):
        low_bits, above_low = _histogram_pick(low[index], k - above_bucket)
        results.append(((bucket << 16) | low_bits, above_bucket + above_low, k))
    return results


def _make_task_arithmetic(sparsify: str | None, consensus: bool) -> Callable[..., Iterator[torch.Tensor]]:
    """Base + lambda × combined deltas; optionally sparsified (magnitude or random) and sign-elected (TIES)."""

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
        weights = _weights(params)
        densities = [float(p.get("density", 1.0)) for p in params.per_model]
        if sparsify == "magnitude":
            pruners = _magnitude_masks(blocks, densities)
        elif sparsify == "random":
            seed = int(params.values["seed"])
            pruners = [
                _RandomMask(density, seed, params.tensor_name, index) if density < 1.0 else None
                for index, density in enumerate(densities)
            ]
        else:
            pruners = [None] * len(densities)
        scales = _rescale_factors(blocks, pruners) if params.values.get("rescale") else [1.0] * len(pruners)
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


def _elect_signs(weighted: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: the sign of the summed weighted deltas wins (a tie counts as +); only deltas of that
    sign are summed, and the divisor is the sum of their models' weights (0 becomes 1). Zeros never agree."""
    total = weighted[0].clone()
    for delta in weighted[1:]:
        total += delta
    sign = torch.where(total >= 0, 1.0, -1.0)
    agreeing = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for delta, weight in zip(weighted, weights, strict=True):
        along = delta * sign
        divisor.add_(along > 0, alpha=weight)
        agreeing += along.clamp_(min=0.0)
    divisor[divisor == 0] = 1.0
    return agreeing.mul_(sign), divisor


def _magnitude_masks(blocks: BlockSource, densities: list[float]) -> list[_TopKMask | None]:
    """TIES: the exact magnitude cut of each delta over the whole tensor, found by streaming."""
    sparse = [index for index, density in enumerate(densities) if density < 1.0]
    masks: list[_TopKMask | None] = [None] * len(densities)
    if not sparse:
        return masks

    def magnitude_bits() -> Iterator[list[torch.Tensor]]:
        for _, (base, *models) in blocks():
            yield [_float_bits((models[index] - base).abs()) for index in sparse]

    def choose_ks(numel: int) -> list[int]:
        return [max(1, int(densities[index] * numel)) for index in sparse]

    for index, (threshold, above, k) in zip(sparse, _top_cuts(magnitude_bits, choose_ks), strict=True):
        masks[index] = _TopKMask(threshold, k - above)
    return masks


def _rescale_factors(blocks: BlockSource, pruners: list) -> list[float]:
    """The factor that gives each pruned delta back its L1 norm (1 where the norm is ~0)."""
    factors = [1.0] * len(pruners)
    sparse = {index: pruner.fresh() for index, pruner in enumerate(pruners) if pruner is not None}
    before = dict.fromkeys(sparse, 0.0)
    after = dict.fromkeys(sparse, 0.0)
    for row_start, (base, *models) in blocks():
        for index, pruner in sparse.items():
            delta = models[index] - base
            before[index] += float(torch.linalg.vector_norm(delta, 1))
            after[index] += float(torch.linalg.vector_norm(delta * pruner.keep(row_start, delta), 1))
    for index in sparse:
        if before[index] >= RESCALE_EPS and after[index] >= RESCALE_EPS:
            factors[index] = before[index] / after[index]
    return factors


_GTA_PARAMETERS = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
"""int8_mask is accepted for mergekit configs; it only picks mergekit's mask dtype and changes no number here."""
_GTA_MODEL_PARAMETERS = {"weight": None, "density": 1.0}

BUILTIN_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "linear",
            _linear,
            uses_base=False,
            parameters={"normalize": True},
            model_parameters={"weight": None},
        ),
        MergeMethod("slerp", _slerp, uses_base=True, parameters={"t": None}, min_models=1, max_models=1),
        MergeMethod(
            "task_arithmetic",
            _make_task_arithmetic(None, consensus=False),
            uses_base=True,
            parameters=_GTA_PARAMETERS,
            model_parameters={"weight": None},
        ),
        MergeMethod(
            "ties",
            _make_task_arithmetic("magnitude", consensus=True),
            uses_base=True,
            parameters={**_GTA_PARAMETERS, "normalize": True},
            model_parameters=_GTA_MODEL_PARAMETERS,
        ),
        MergeMethod(
            "dare_ties",
            _make_task_arithmetic("random", consensus=True),
            uses_base=True,
            parameters={**_GTA_PARAMETERS, "rescale": True, "seed": 0},
            model_parameters=_GTA_MODEL_PARAMETERS,
        ),
        MergeMethod(
            "dare_linear",
            _make_task_arithmetic("random", consensus=False),
            uses_base=True,
            parameters={**_GTA_PARAMETERS, "rescale": True, "seed": 0},
            model_parameters=_GTA_MODEL_PARAMETERS,
        ),
        MergeMethod("passthrough", _passthrough, uses_base=False, max_models=1),
    )
}

ENTRY_POINT_GROUP = "mergebot.methods"


def whole_tensor_method(
    name: str,
    function: Callable[[torch.Tensor | None, list[torch.Tensor], TensorParams], torch.Tensor],
    *,
    uses_base: bool,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Any] | None = None,
) -> MergeMethod:
    """Wrap a plain per-tensor function (whole float32 tensors in, one out) as a method, for plug-ins."""

    def merge(blocks: BlockSource, params: TensorParams) -> Iterator[torch.Tensor]:
        parts = [inputs for _, inputs in blocks()]
        whole = [torch.cat(column) for column in zip(*parts, strict=True)]
        base, models = (whole[0], whole[1:]) if uses_base else (None, whole)
        yield function(base, models, params)

    return MergeMethod(
        name,
        merge,
        uses_base=uses_base,
        parameters=dict(parameters or {}),
        model_parameters=dict(model_parameters or {}),
    )


def available_methods() -> dict[str, MergeMethod]:
    """Built-in methods plus those that installed packages register in the `mergebot.methods` entry point group."""
    methods = dict(BUILTIN_METHODS)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        method = entry_point.load()
        if not isinstance(method, MergeMethod):
            raise ConfigError(f"entry point {entry_point.name!r} in {ENTRY_POINT_GROUP} is not a MergeMethod")
        methods.setdefault(method.name, method)
    return methods
