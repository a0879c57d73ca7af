"""Merge methods against direct, independent computations of the published (mergekit) definitions.

Every method is driven through its public interface, `MergeMethod.merge(blocks, TensorParams)`, with the inputs
split into row blocks of several sizes (one row, a few rows, the whole tensor). The expectations are computed here,
on whole float32 tensors, from the definitions users compare with:

- linear: Σ wᵢxᵢ, divided by Σ wᵢ when `normalize`;
- slerp: the flattened tensor is one vector; the angle comes from normalized copies (norm ≤ 1e-8 → left as is);
  |cos| > 0.9995 → lerp; otherwise sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1; t = 0 is the base;
- generalized task arithmetic (task_arithmetic, ties, dare_*): delta = model − base, optionally sparsified
  (magnitude: the top k = int(density·numel) |delta| entries; random: a Bernoulli(density) mask, rescaled so the
  delta keeps its L1 norm), weighted by w; TIES elects the sign of Σ w·delta (≥ 0 → +), keeps the agreeing entries
  (a zero never agrees) and divides by Σ w·agree (0 → 1); non-consensus methods divide by Σ w (|Σ w| < 1e-8 → 1);
  `normalize` turns the division on; result = base + λ·mixed.

DARE's random mask is the one thing the definition leaves to the implementation; it is read back with a probe
(a unit delta for one model, zeros elsewhere, no rescale) and then everything else is checked against the reference.
"""

import math
import sys
import textwrap
import uuid
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from mergebot.errors import ConfigError
from mergebot.merge.methods import (
    BUILTIN_METHODS,
    ENTRY_POINT_GROUP,
    MergeMethod,
    TensorParams,
    available_methods,
    whole_tensor_method,
)
from mergebot.merge.methods.topk import top_cuts

TENSOR_NAME = "model.layers.3.mlp.up_proj.weight"
ROWS = [1, 3, None]
"""Block sizes: one row per block, a few rows (not dividing the row count), the whole tensor in one block."""
SHAPES = [(10, 7), (13,)]
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Driving the methods through their public interface
# --------------------------------------------------------------------------------------------------------------------


def random_tensors(count: int, shape: Sequence[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(count)]


def block_source(tensors: list[torch.Tensor], rows: int | None):
    """A re-iterable source of (first row, [row block of each input]); every call is a fresh pass."""
    total = tensors[0].shape[0]
    step = total if rows is None else rows
    passes = []

    def blocks():
        passes.append(1)
        return ((start, [t[start : start + step] for t in tensors]) for start in range(0, total, step))

    blocks.passes = passes
    return blocks


def run_method(
    method: MergeMethod | str,
    tensors: list[torch.Tensor],
    rows: int | None,
    values: dict | None = None,
    per_model: Sequence[dict] = (),
    tensor_name: str = TENSOR_NAME,
) -> torch.Tensor:
    """Merge through `method.merge`, with defaults filled in as the planner does; checks the output contract."""
    if isinstance(method, str):
        method = BUILTIN_METHODS[method]
    params = TensorParams(
        tensor_name,
        {**method.parameters, **(values or {})},
        tuple({**method.model_parameters, **p} for p in per_model),
    )
    originals = [t.clone() for t in tensors]
    out_blocks = list(method.merge(block_source(tensors, rows), params))
    assert out_blocks, "a method must yield at least one block"
    assert all(block.dtype == torch.float32 for block in out_blocks)
    for tensor, original in zip(tensors, originals, strict=True):
        assert torch.equal(tensor, original), "a method must not modify its input blocks"
    out = torch.cat(out_blocks)
    assert out.shape == tensors[0].shape
    return out


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, no rounding difference allowed (−0.0 and +0.0 count as equal)."""
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


def assert_ref(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------------
# Independent references (whole tensors)
# --------------------------------------------------------------------------------------------------------------------


def weight_column(weights: Sequence[float], dims: int) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * dims))


def ref_linear(models: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    w = weight_column(weights, models[0].dim())
    out = (torch.stack(models) * w).sum(0)
    return out / w.sum(0) if normalize else out


def ref_lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def ref_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, threshold: float = 0.9995, eps: float = 1e-8):
    """mergekit's slerp: numpy float32 on the flattened tensor, normalized copies for the angle."""
    a = v0.numpy().astype(np.float32).ravel()
    b = v1.numpy().astype(np.float32).ravel()

    def unit(v):
        norm = np.linalg.norm(v)
        return v / norm if norm > eps else v

    dot = np.sum(unit(a) * unit(b))
    if np.abs(dot) > threshold:
        res = (1 - t) * a + t * b
    else:
        theta = np.arccos(dot)
        sin_theta = np.sin(theta)
        res = np.sin(theta - theta * t) / sin_theta * a + np.sin(theta * t) / sin_theta * b
    return torch.from_numpy(np.asarray(res, dtype=np.float32).reshape(v0.shape))


def slerp_formula64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The spherical formula without the colinear fallback, in float64 (to tell the two branches apart)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = float(a @ b / (a.norm() * b.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.float().reshape(v0.shape)


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Top k = int(density·numel) entries by |delta|; among equal magnitudes the first in flat order."""
    k = int(density * delta.numel())
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(delta.shape)


def ref_gta(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    densities: Sequence[float] | None = None,
    random_masks: Sequence[torch.Tensor | None] | None = None,
    rescale: bool = False,
) -> torch.Tensor:
    deltas = []
    for index, model in enumerate(models):
        delta = model - base
        if densities is not None and densities[index] < 1.0:
            delta = delta * magnitude_keep(delta, densities[index])
        if random_masks is not None and random_masks[index] is not None:
            pruned = delta * random_masks[index]
            if rescale:
                before, after = delta.abs().sum(), pruned.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    pruned = pruned * (before / after)
            delta = pruned
        deltas.append(delta)
    w = weight_column(weights, base.dim())
    weighted = torch.stack(deltas) * w
    if consensus:
        majority = (weighted.sum(0) >= 0).to(torch.float32) * 2 - 1
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


# --------------------------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_linear(shape, normalize, rows):
    models = random_tensors(3, shape, seed=1)
    weights = [0.6, 0.3, 1.3]
    per_model = [{"weight": w} for w in weights]
    out = run_method("linear", models, rows, {"normalize": normalize}, per_model)
    assert_ref(out, ref_linear(models, weights, normalize))
    assert_exact(out, run_method("linear", models, None, {"normalize": normalize}, per_model))
    if normalize:  # the weights do not sum to one: normalizing must change the result
        assert not torch.allclose(out, ref_linear(models, weights, False))


def test_linear_normalize_is_weighted_mean():
    models = [torch.full((4, 3), v) for v in (1.0, 2.0, 3.0)]
    out = run_method("linear", models, 1, {"normalize": True}, [{"weight": w} for w in (1.0, 1.0, 2.0)])
    assert_ref(out, torch.full((4, 3), (1 + 2 + 6) / 4))


# --------------------------------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------------------------------


def colinear_pair(cos: float, shape=(10, 7), seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """v0 and v1 (different norms) whose flattened cosine is `cos`."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    u = torch.randn(numel, generator=generator, dtype=torch.float64)
    u /= u.norm()
    w = torch.randn(numel, generator=generator, dtype=torch.float64)
    w -= (w @ u) * u
    w /= w.norm()
    v0 = 2.0 * u
    v1 = 5.0 * (cos * u + math.sqrt(max(0.0, 1 - cos * cos)) * w)
    return v0.float().reshape(shape), v1.float().reshape(shape)


@pytest.mark.parametrize("t", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["random", "colinear"])
@pytest.mark.parametrize("rows", ROWS)
def test_slerp_endpoints(t, kind, rows):
    v0, v1 = random_tensors(2, (10, 7), seed=2) if kind == "random" else colinear_pair(1.0)
    out = run_method("slerp", [v0, v1], rows, {"t": t})
    assert_exact(out, v0 if t == 0.0 else v1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_slerp(shape, t, correlated, rows):
    v0, v1 = random_tensors(2, shape, seed=3)
    if correlated:
        v1 = 1.7 * v0 + 0.4 * v1
    out = run_method("slerp", [v0, v1], rows, {"t": t})
    expected = ref_slerp(t, v0, v1)
    assert_ref(out, expected)
    # the spherical branch is taken: the result is not the straight line
    assert (out - ref_lerp(t, v0, v1)).abs().max() > 1e-3
    # block sizes only change the summation order of the angle
    torch.testing.assert_close(out, run_method("slerp", [v0, v1], None, {"t": t}), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("cos", "fallback"),
    [(1.0, True), (-1.0, True), (0.99999, True), (0.9996, True), (-0.9996, True), (0.9994, False), (-0.9994, False)],
)
@pytest.mark.parametrize("rows", ROWS)
def test_slerp_colinear_fallback(cos, fallback, rows):
    v0, v1 = colinear_pair(cos)
    t = 0.5
    out = run_method("slerp", [v0, v1], rows, {"t": t})
    lerp = ref_lerp(t, v0, v1)
    # Near cos = −1 the spherical result is a large cancellation whose float32 angle is ill-conditioned
    # (dθ ≈ 1e-7 / sin θ, coefficients ≈ 1 / sin θ ≈ 29 here): compare loosely there, tightly elsewhere.
    rtol = 1e-6 if cos > 0 else 2e-4
    assert_ref(out, ref_slerp(t, v0, v1), rtol=rtol, atol=1e-6)
    if fallback:
        assert_ref(out, lerp, rtol=1e-6, atol=1e-7)
        if abs(cos) < 0.9999:  # far enough from colinear that the spherical formula differs measurably
            assert (out - slerp_formula64(t, v0, v1)).abs().max() > 1e-5
    else:
        assert_ref(out, slerp_formula64(t, v0, v1), rtol=rtol, atol=1e-6)
        assert (out - lerp).abs().max() > 1e-5


@pytest.mark.parametrize("zero", ["base", "other", "both"])
@pytest.mark.parametrize("t", [0.3, 0.7])
@pytest.mark.parametrize("rows", ROWS)
def test_slerp_zero_norm(zero, t, rows):
    v0, v1 = random_tensors(2, (10, 7), seed=4)
    if zero in ("base", "both"):
        v0 = torch.zeros_like(v0)
    if zero in ("other", "both"):
        v1 = torch.zeros_like(v1)
    out = run_method("slerp", [v0, v1], rows, {"t": t})
    assert torch.isfinite(out).all()
    assert_ref(out, ref_slerp(t, v0, v1))
    # a zero vector is orthogonal to everything: θ = π/2
    expected = math.sin(math.pi / 2 * (1 - t)) * v0 + math.sin(math.pi / 2 * t) * v1
    assert_ref(out, expected)


# --------------------------------------------------------------------------------------------------------------------
# task_arithmetic
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("normalize", "lam"), [(False, 1.0), (True, 1.0), (False, 0.6), (True, 1.7)])
@pytest.mark.parametrize("rows", ROWS)
def test_task_arithmetic(shape, normalize, lam, rows):
    base, *models = random_tensors(4, shape, seed=6)
    weights = [0.7, -0.2, 0.9]
    per_model = [{"weight": w} for w in weights]
    values = {"normalize": normalize, "lambda": lam}
    out = run_method("task_arithmetic", [base, *models], rows, values, per_model)
    assert_ref(out, ref_gta(base, models, weights, consensus=False, normalize=normalize, lam=lam))
    assert_exact(out, run_method("task_arithmetic", [base, *models], None, values, per_model))


@pytest.mark.parametrize("rows", ROWS)
def test_task_arithmetic_zero_weight_sum_divides_by_one(rows):
    base, m1, m2 = random_tensors(3, (10, 7), seed=7)
    per_model = [{"weight": 1.0}, {"weight": -1.0}]
    out = run_method("task_arithmetic", [base, m1, m2], rows, {"normalize": True, "lambda": 0.5}, per_model)
    assert torch.isfinite(out).all()
    assert_ref(out, base + 0.5 * ((m1 - base) - (m2 - base)))


# --------------------------------------------------------------------------------------------------------------------
# ties
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (8,)])
@pytest.mark.parametrize("densities", [(1.0, 1.0, 1.0), (0.5, 0.3, 1.0), (0.2, 0.7, 0.45)])
@pytest.mark.parametrize(("normalize", "lam"), [(True, 1.0), (False, 0.6)])
@pytest.mark.parametrize("rows", [1, 4, None])
def test_ties(shape, densities, normalize, lam, rows):
    base, *models = random_tensors(4, shape, seed=8)
    weights = [0.8, 0.5, -0.3]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    values = {"normalize": normalize, "lambda": lam}
    out = run_method("ties", [base, *models], rows, values, per_model)
    expected = ref_gta(base, models, weights, consensus=True, normalize=normalize, lam=lam, densities=densities)
    assert_ref(out, expected)
    assert_exact(out, run_method("ties", [base, *models], None, values, per_model))


@pytest.mark.parametrize(
    ("d1", "d2", "w1", "w2", "normalize", "expected"),
    [
        # Σ w·delta = 0 is a tie: it counts as +, so only the positive deltas are kept
        ([1.0, -2.0], [-1.0, 2.0], 1.0, 1.0, True, [1.0, 2.0]),
        ([1.0, -2.0], [-1.0, 2.0], 1.0, 1.0, False, [1.0, 2.0]),
        # the weight multiplies the delta before the vote: 3·1 + 1·(−2) > 0 although 1 + (−2) < 0
        ([1.0, 1.0], [-2.0, -2.0], 3.0, 1.0, True, [1.0, 1.0]),
        ([1.0, 1.0], [-2.0, -2.0], 3.0, 1.0, False, [3.0, 3.0]),
        # a zero delta never agrees, so its weight is not in the divisor
        ([2.0, -2.0], [0.0, 0.0], 1.0, 3.0, True, [2.0, -2.0]),
        # the agreeing weights sum to zero: divide by one
        ([1.0, -4.0], [-1.0, 4.0], 1.0, -1.0, True, [2.0, -8.0]),
        # nothing to merge: the base, no NaN
        ([0.0, 0.0], [0.0, 0.0], 1.0, 1.0, True, [0.0, 0.0]),
    ],
)
def test_ties_sign_vote_by_hand(d1, d2, w1, w2, normalize, expected):
    base = torch.tensor([[0.5, -1.5]] * 3)
    rows = torch.ones(3, 1)
    models = [base + rows * torch.tensor(d1), base + rows * torch.tensor(d2)]
    per_model = [{"weight": w1, "density": 1.0}, {"weight": w2, "density": 1.0}]
    out = run_method("ties", [base, *models], 1, {"normalize": normalize, "lambda": 1.0}, per_model)
    assert_ref(out, base + rows * torch.tensor(expected))


def tied_magnitudes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deltas of magnitude 1, 2 or 3 (60 %, 30 %, 10 %), random signs: many exact ties at every cut."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(shape, generator=generator)
    magnitude = torch.where(uniform < 0.1, 3.0, torch.where(uniform < 0.4, 2.0, 1.0))
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return magnitude * sign


@pytest.mark.parametrize("density", [1 / 120, 0.3, 0.55, 0.8, 119 / 120])
@pytest.mark.parametrize("rows", [1, 4, None])
def test_ties_topk_with_equal_magnitudes_keeps_exactly_k(density, rows):
    shape = (6, 20)
    base = torch.zeros(shape)
    delta = tied_magnitudes(shape, seed=9)
    out = run_method("ties", [base, delta], rows, {"normalize": True}, [{"weight": 1.0, "density": density}])
    k = int(density * delta.numel())
    kept = out != 0
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], delta[kept])
    if k < delta.numel():
        assert delta[kept].abs().min() >= delta[~kept].abs().max()
    # among equal magnitudes at the cut, the first in flat order (identical for every block size)
    assert_exact(out, delta * magnitude_keep(delta, density))


@pytest.mark.parametrize("rows", [1, 4, None])
def test_ties_topk_per_model_with_ties(rows):
    shape = (6, 20)
    base = torch.zeros(shape)
    deltas = [tied_magnitudes(shape, seed=s) for s in (10, 11)]
    densities = [0.25, 0.6]
    per_model = [{"weight": 1.0, "density": d} for d in densities]
    out = run_method("ties", [base, *deltas], rows, {"normalize": False}, per_model)
    expected = ref_gta(base, deltas, [1.0, 1.0], consensus=True, normalize=False, densities=densities)
    assert_exact(out, expected)


# --------------------------------------------------------------------------------------------------------------------
# dare_ties, dare_linear
# --------------------------------------------------------------------------------------------------------------------

DARE = ["dare_ties", "dare_linear"]


def dare_masks(
    method: str, shape, densities: Sequence[float], seed: int, rows: int | None, tensor_name: str = TENSOR_NAME
) -> list[torch.Tensor | None]:
    """Read back each model's random keep-mask: a unit delta for that model, zero for the others, no rescale."""
    masks: list[torch.Tensor | None] = []
    for index, density in enumerate(densities):
        base = torch.zeros(shape)
        models = [torch.ones(shape) if j == index else torch.zeros(shape) for j in range(len(densities))]
        per_model = [{"weight": 1.0, "density": d} for d in densities]
        values = {"normalize": False, "lambda": 1.0, "rescale": False, "seed": seed}
        out = run_method(method, [base, *models], rows, values, per_model, tensor_name)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        masks.append(out == 1 if density < 1.0 else None)
        if density >= 1.0:
            assert bool((out == 1).all())
    return masks


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize(("rescale", "normalize"), [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("rows", ROWS)
def test_dare(method, rescale, normalize, rows):
    shape = (10, 7)
    base, *models = random_tensors(4, shape, seed=12)
    weights = [0.6, 0.9, -0.4]
    densities = [0.5, 0.3, 1.0]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    values = {"normalize": normalize, "lambda": 0.8, "rescale": rescale, "seed": 7}
    out = run_method(method, [base, *models], rows, values, per_model)
    masks = dare_masks(method, shape, densities, seed=7, rows=rows)
    expected = ref_gta(
        base,
        models,
        weights,
        consensus=method == "dare_ties",
        normalize=normalize,
        lam=0.8,
        random_masks=masks,
        rescale=rescale,
    )
    assert_ref(out, expected)


@pytest.mark.parametrize(
    ("method", "normalize", "rescale"),
    [
        ("task_arithmetic", False, False),
        ("ties", True, False),
        ("dare_ties", False, True),
        ("dare_linear", False, True),
    ],
)
def test_defaults_match_mergekit(method, normalize, rescale):
    """normalize: true for ties only; rescale: true for dare_*; lambda 1; density 1 unless given."""
    parameters = BUILTIN_METHODS[method].parameters
    assert parameters["normalize"] is normalize
    assert parameters.get("rescale") is rescale
    assert parameters["lambda"] == 1.0
    assert BUILTIN_METHODS[method].model_parameters.get("density", 1.0) == 1.0


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize("rows", [3, None])
def test_dare_deterministic_for_a_seed(method, rows):
    base, *models = random_tensors(3, (10, 7), seed=13)
    per_model = [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    first = run_method(method, [base, *models], rows, {"seed": 3}, per_model)
    second = run_method(method, [base, *models], rows, {"seed": 3}, per_model)
    assert_exact(first, second)
    other = run_method(method, [base, *models], rows, {"seed": 4}, per_model)
    assert not torch.equal(first, other)
    masks_3 = dare_masks(method, (10, 7), [0.4, 0.6], seed=3, rows=rows)
    masks_4 = dare_masks(method, (10, 7), [0.4, 0.6], seed=4, rows=rows)
    for a, b in zip(masks_3, masks_4, strict=True):
        assert not torch.equal(a, b)


@pytest.mark.parametrize("method", DARE)
def test_dare_masks_are_independent_per_model_and_tensor(method):
    shape = (20, 10)
    first, second = dare_masks(method, shape, [0.5, 0.5], seed=0, rows=None)
    assert not torch.equal(first, second)
    (other_tensor,) = dare_masks(
        method, shape, [0.5], seed=0, rows=None, tensor_name="model.layers.4.mlp.up_proj.weight"
    )
    assert not torch.equal(first, other_tensor)


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize("rows", [7, None])
def test_dare_kept_fraction_is_density(method, rows):
    shape = (200, 50)
    densities = [0.1, 0.5, 0.9]
    for density, mask in zip(densities, dare_masks(method, shape, densities, seed=11, rows=rows), strict=True):
        # binomial standard deviation ≤ 0.005 at 10 000 entries; the masks are fixed by the seed
        assert abs(mask.float().mean().item() - density) < 0.02


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("rows", ROWS)
def test_dare_rescale_keeps_l1_norm(method, density, rows):
    base = torch.zeros(10, 7)
    (delta,) = random_tensors(1, (10, 7), seed=14)
    per_model = [{"weight": 1.0, "density": density}]
    rescaled = run_method(method, [base, delta], rows, {"rescale": True, "seed": 5}, per_model)
    pruned = run_method(method, [base, delta], rows, {"rescale": False, "seed": 5}, per_model)
    kept = pruned != 0
    assert 0 < int(kept.sum()) < delta.numel()
    # without rescale: each entry is the delta or zero
    assert torch.equal(pruned[kept], delta[kept])
    assert pruned.abs().sum() < delta.abs().sum()
    # with rescale: the same entries, one common factor, the L1 norm of the whole delta restored
    assert torch.equal(rescaled != 0, kept)
    factor = delta.abs().sum() / delta[kept].abs().sum()
    assert_ref(rescaled, delta * kept * factor)
    assert_ref(rescaled.abs().sum(), delta.abs().sum())


@pytest.mark.parametrize("method", DARE)
@pytest.mark.parametrize("case", ["zero_delta", "nothing_kept"])
@pytest.mark.parametrize("rows", [3, None])
def test_dare_rescale_of_a_zero_norm_is_skipped(method, case, rows):
    """A delta whose L1 norm before or after pruning is below 1e-7 is not rescaled (no division by zero)."""
    shape = (10, 7)
    base, other = random_tensors(2, shape, seed=21)
    (mask, _) = dare_masks(method, shape, [0.5, 1.0], seed=9, rows=rows)
    # zero_delta: the model is the base; nothing_kept: its delta lives only where the mask drops entries
    model = base.clone() if case == "zero_delta" else base + torch.where(mask, 0.0, 1.5)
    per_model = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 1.0}]
    values = {"normalize": False, "lambda": 1.0, "rescale": True, "seed": 9}
    out = run_method(method, [base, model, other], rows, values, per_model)
    expected = ref_gta(
        base,
        [model, other],
        [1.0, 0.5],
        consensus=method == "dare_ties",
        normalize=False,
        random_masks=[mask, None],
        rescale=True,
    )
    assert_ref(out, expected)
    assert_ref(out, base + 0.5 * (other - base))


@pytest.mark.parametrize(("method", "equivalent"), [("dare_ties", "ties"), ("dare_linear", "task_arithmetic")])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_dare_density_one_is_plain_task_arithmetic(method, equivalent, rescale, rows):
    base, *models = random_tensors(3, (10, 7), seed=15)
    weights = [0.7, 0.4]
    values = {"normalize": True, "lambda": 0.9}
    dare = run_method(
        method, [base, *models], rows, {**values, "rescale": rescale}, [{"weight": w, "density": 1.0} for w in weights]
    )
    per_model = [{"weight": w, "density": 1.0} if equivalent == "ties" else {"weight": w} for w in weights]
    assert_exact(dare, run_method(equivalent, [base, *models], rows, values, per_model))
    expected = ref_gta(base, models, weights, consensus=method == "dare_ties", normalize=True, lam=0.9)
    assert_ref(dare, expected)


@pytest.mark.parametrize("method", DARE)
def test_dare_same_result_for_every_block_size(method):
    """The engine picks block sizes from the tensor shape; the random masks must not depend on them."""
    shape = (10, 7)
    whole = dare_masks(method, shape, [0.5, 0.3], seed=2, rows=None)
    for rows in (1, 3):
        for mask, expected in zip(dare_masks(method, shape, [0.5, 0.3], seed=2, rows=rows), whole, strict=True):
            assert torch.equal(mask, expected), f"mask with {rows}-row blocks differs from the whole-tensor mask"


# --------------------------------------------------------------------------------------------------------------------
# passthrough
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_passthrough(shape, rows):
    (tensor,) = random_tensors(1, shape, seed=16)
    assert BUILTIN_METHODS["passthrough"].max_models == 1
    assert_exact(run_method("passthrough", [tensor], rows), tensor)


# --------------------------------------------------------------------------------------------------------------------
# top_cuts: the streaming exact top-k
# --------------------------------------------------------------------------------------------------------------------


def magnitudes(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return torch.rand(shape, generator=generator) * 10
    if kind == "ties":  # five values, zeros included
        levels = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e30])
        return levels[torch.randint(0, 5, shape, generator=generator)]
    if kind == "close":  # one high 16-bit bucket, resolved only by the low bits
        steps = torch.randint(0, 40, shape, generator=generator, dtype=torch.int32)
        return (torch.tensor(1.0).view(torch.int32) + steps).view(torch.float32)
    if kind == "wide":  # many exponents, some zeros and subnormals
        values = torch.exp(torch.randn(shape, generator=generator) * 30)
        values[torch.rand(shape, generator=generator) < 0.1] = 0.0
        values[torch.rand(shape, generator=generator) < 0.05] = 1e-40
        return values
    raise AssertionError(kind)


def expected_kth(values: torch.Tensor, k: int) -> tuple[int, int]:
    flat = values.reshape(-1)
    kth = torch.kthvalue(flat, flat.numel() - k + 1).values
    return int(kth.view(torch.int32)), int((flat > kth).sum())


@pytest.mark.parametrize("kind", ["continuous", "ties", "close", "wide"])
@pytest.mark.parametrize("rows", [1, 2, None])
def test_top_cuts_finds_the_exact_kth_largest(kind, rows):
    shape = (5, 9)
    streams = [magnitudes(kind, shape, seed=s) for s in (17, 18)]
    bits = [s.view(torch.int32) for s in streams]
    step = shape[0] if rows is None else rows
    numel = streams[0].numel()

    def passes():
        return ([b[start : start + step] for b in bits] for start in range(0, shape[0], step))

    for k_pair in [(1, numel), (numel // 2, 37), (numel - 1, 2)]:
        result = [(threshold, above) for threshold, above, _ in top_cuts(passes, lambda _, ks=k_pair: list(ks))]
        assert result == [expected_kth(s, k) for s, k in zip(streams, k_pair, strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# plug-ins: whole_tensor_method and entry points
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uses_base", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_whole_tensor_method(uses_base, rows):
    seen = []

    def scaled_sum(base, models, params):
        seen.append((base, models))
        offset = base if base is not None else torch.zeros_like(models[0])
        return offset + float(params.values["alpha"]) * sum(
            m * p["weight"] for m, p in zip(models, params.per_model, strict=True)
        )

    method = whole_tensor_method(
        "scaled_sum", scaled_sum, uses_base=uses_base, parameters={"alpha": 1.0}, model_parameters={"weight": 1.0}
    )
    assert isinstance(method, MergeMethod)
    assert (method.name, method.uses_base) == ("scaled_sum", uses_base)
    assert dict(method.parameters) == {"alpha": 1.0}
    assert dict(method.model_parameters) == {"weight": 1.0}
    tensors = random_tensors(3, (10, 7), seed=19)
    out = run_method(method, tensors, rows, {"alpha": 0.5}, [{"weight": 2.0}] * (2 if uses_base else 3))
    assert len(seen) == 1
    base, models = seen[0]
    if uses_base:
        assert_exact(base, tensors[0])
    else:
        assert base is None
    assert len(models) == (2 if uses_base else 3)
    for model, tensor in zip(models, tensors[1:] if uses_base else tensors, strict=True):
        assert_exact(model, tensor)
    models_in = tensors[1:] if uses_base else tensors
    offset = tensors[0] if uses_base else torch.zeros_like(tensors[0])
    assert_ref(out, offset + 0.5 * sum(2.0 * m for m in models_in))


def test_available_methods_has_builtins():
    methods = available_methods()
    expected = {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"}
    assert expected <= set(methods)
    for name in expected:
        assert methods[name] is BUILTIN_METHODS[name]


@pytest.fixture()
def install_plugin(tmp_path, monkeypatch):
    """Installs fake distributions on sys.path, each declaring one `mergebot.methods` entry point."""
    modules = []

    def install(module_source: str, entry_name: str) -> str:
        module = f"mergebot_fake_plugin_{uuid.uuid4().hex}"
        root = tmp_path / module
        dist_info = root / f"{module}-1.0.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_name} = {module}:METHOD\n")
        (root / f"{module}.py").write_text(textwrap.dedent(module_source))
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


PLUGIN = """
    import torch

    from mergebot.merge.methods import whole_tensor_method


    def _elementwise_max(base, models, params):
        return torch.stack(models).amax(0) * float(params.values["scale"])


    METHOD = whole_tensor_method("{name}", _elementwise_max, uses_base=False, parameters={{"scale": 1.0}})
"""


@pytest.mark.parametrize("rows", [1, None])
def test_entry_point_method_is_available(install_plugin, rows):
    install_plugin(PLUGIN.format(name="elementwise_max"), "elementwise_max")
    methods = available_methods()
    assert "elementwise_max" in methods
    method = methods["elementwise_max"]
    assert isinstance(method, MergeMethod)
    assert not method.uses_base
    for name, builtin in BUILTIN_METHODS.items():
        assert methods[name] is builtin
    models = random_tensors(3, (10, 7), seed=20)
    out = run_method(method, models, rows, {"scale": 2.0}, [{}, {}, {}])
    assert_exact(out, torch.maximum(torch.maximum(models[0], models[1]), models[2]) * 2.0)


def test_entry_point_cannot_replace_a_builtin(install_plugin):
    install_plugin(PLUGIN.format(name="linear"), "linear")
    assert available_methods()["linear"] is BUILTIN_METHODS["linear"]


def test_entry_point_that_is_not_a_method_is_refused(install_plugin):
    install_plugin("METHOD = 42\n", "not_a_method")
    with pytest.raises(ConfigError, match="not_a_method"):
        available_methods()
