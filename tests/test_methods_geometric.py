"""model_stock, nuslerp, multislerp, karcher, nearswap and arcee_fusion against direct whole-tensor computations.

As in test_methods.py, each method runs through `MergeMethod.merge` on row blocks of several sizes, and the
expectations are written here from the published definitions (mergekit 0.1.5's semantics), on whole tensors, in
float64 where mergebot claims exact arithmetic:

- model_stock: deltas dᵢ = wᵢ − w₀; cos = mean pairwise dᵢ·dⱼ / max(|dᵢ||dⱼ|, 1e-6) (clamped to [−1, 1]) over the
  flattened tensor or each row (`filter_wise`; a 1-D tensor is one row); t = N·cos / (1 + (N−1)·cos), 0 where
  |1 + (N−1)·cos| < 1e-6; result t·mean(wᵢ) + (1−t)·w₀;
- nuslerp: t = w₂ / (w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6); slerp of the two models (of their deltas, added back to
  the base, with a base) over the flattened tensor, its columns (`nuslerp_row_wise`) or its rows; unit vectors from
  norms floored at 1e-7; 1 − cos² ≤ 1e-16 → lerp;
- multislerp: every step of the tangent-space construction (unit vectors uᵢ = vᵢ / (|vᵢ| + eps), weighted mean m̂,
  tangent vectors, exponential map back, × Σ wᵢ|vᵢ|); below |m| < eps the weighted sum of the vectors;
- karcher: the fixed-point iteration on the unit sphere in the full space, equal weights, × the mean norm;
- nearswap: w = clamp(t / max(|base − model|, 1e-6), 0, 1); w·model + (1 − w)·base;
- arcee_fusion: importance |Δ| × KL(softmax(model) + 1e-8 ‖ softmax(base) + 1e-8) along the last dim; quartiles of
  the sorted importance at index floor(q·(n − 1)); the model where importance ≥ median + 1.5·IQR.
"""

import math
from pathlib import Path

import pytest
import torch

from mergebot.merge.methods import BUILTIN_METHODS, TensorParams, geometry
from tests.helpers import load_tensors, run_cli
from tests.mergekit_reference import write_models
from tests.test_methods import assert_exact, random_tensors, run_method

ROWS = [1, 3, None]
SHAPES = [(10, 7), (13,), (3, 4, 5)]
SMALL_GRID = 12
"""Grid chunks of 12 elements in most tests, so these small tensors span several chunks that the row blocks cut
across (one row of (10, 7) or (3, 4, 5); 12 entries of (13,))."""


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    monkeypatch.setattr(geometry, "GRID_ELEMENTS", SMALL_GRID)


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding of the exact (float64) value."""
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected.float(), rtol=1e-6, atol=1e-7 * float(expected.abs().max()) + 1e-12)


def run_everywhere(method: str, tensors, values=None, per_model=()) -> torch.Tensor:
    """The output for every block size, which must be byte-identical; returns it."""
    outputs = [run_method(method, tensors, rows, values, per_model) for rows in ROWS]
    for out in outputs[:-1]:
        assert_exact(out, outputs[-1])
    return outputs[-1]


def weighted(weights) -> list[dict]:
    return [{"weight": w} for w in weights]


# --------------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------------


def ref_model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    w0 = base.double()
    vectors = w0.reshape(1, -1) if not filter_wise or w0.dim() == 1 else w0
    deltas = [m.double().reshape(vectors.shape) - vectors for m in models]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            scale = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(-1) / scale).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, count * cos / denominator)
    average = sum(m.double().reshape(vectors.shape) for m in models) / count
    return (t * average + (1 - t) * vectors).reshape(base.shape)


def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    a, b = v0.double(), v1.double()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = 1 - cos**2 <= 1e-16
    theta = torch.acos(cos)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(v0.shape)


def nuslerp_expected(t: float, base, m1, m2, flatten: bool, row_wise: bool) -> torch.Tensor:
    if base is None:
        return ref_nuslerp(t, m1, m2, flatten, row_wise)
    b = base.double()
    return b + ref_nuslerp(t, m1.double() - b, m2.double() - b, flatten, row_wise)


def ref_multislerp(models, weights, base=None, normalize=True, eps=1e-8) -> torch.Tensor:
    shape = models[0].shape
    vectors = torch.stack([m.double().reshape(-1) for m in models])
    if base is not None:
        vectors = vectors - base.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = vectors.norm(dim=1)
    units = vectors / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    if mean.norm() < eps:
        result = (w[:, None] * vectors).sum(0)
    else:
        mean_hat = mean / mean.norm()
        tangents = units - (units @ mean_hat)[:, None] * mean_hat
        tangent = (w[:, None] * tangents).sum(0)
        step = tangent.norm() + eps
        result = (mean_hat * math.cos(step) + tangent * (math.sin(step) / step)) * float(w @ norms)
    if base is not None:
        result = result + base.double().reshape(-1)
    return result.reshape(shape)


def ref_karcher(tensors, max_iter=10, tol=1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].double()
    xs = [x.double().reshape(-1) for x in tensors]
    norms = [float(x.norm()) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0], dtype=torch.float64)
    units = [xs[i] / norms[i] for i in valid]
    alpha = 1.0 / len(valid)
    mean = sum(alpha * u for u in units)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in units:
            dot = float(mean @ unit)
            theta = math.acos(max(-1.0, min(1.0, dot)))
            if theta >= tol and math.pi - theta >= tol:
                tangent += alpha * theta / math.sin(theta) * (unit - dot * mean)
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * tangent / step
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(norms) * mean).reshape(tensors[0].shape)


def ref_nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    a, b = base.double(), model.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


def fusion_mask(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    return importance >= median + 1.5 * (q3 - q1)


# --------------------------------------------------------------------------------------------------------------------
# model_stock
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock(shape, filter_wise, count):
    base, shared, *deltas = random_tensors(count + 2, shape, seed=30)
    models = [base + 0.2 * shared + 0.3 * delta for delta in deltas]
    out = run_everywhere("model_stock", [base, *models], {"filter_wise": filter_wise}, [{}] * count)
    assert_tight(out, ref_model_stock(base, models, filter_wise))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_limits(filter_wise):
    """Equal deltas give t = 1 (the models' mean); opposed deltas the singular case (the base); no delta: the base."""
    base, delta = random_tensors(2, (6, 5), seed=33)
    same = run_everywhere("model_stock", [base, base + delta, base + delta], {"filter_wise": filter_wise}, [{}] * 2)
    assert_tight(same, base.double() + delta.double())
    opposed = run_everywhere("model_stock", [base, base + delta, base - delta], {"filter_wise": filter_wise}, [{}] * 2)
    assert_exact(opposed, base)
    still = run_everywhere("model_stock", [base, base, base, base], {"filter_wise": filter_wise}, [{}] * 3)
    assert_exact(still, base)


# --------------------------------------------------------------------------------------------------------------------
# nuslerp
# --------------------------------------------------------------------------------------------------------------------

NUSLERP_AXES = [(True, False), (False, True), (False, False)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_AXES)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(shape, flatten, row_wise, with_base):
    base, m1, m2 = random_tensors(3, shape, seed=34)
    m2 = m2 + 0.8 * m1
    values = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    inputs = [base, m1, m2] if with_base else [m1, m2]
    out = run_everywhere("nuslerp", inputs, values, weighted([0.3, 0.5]))
    assert_tight(out, nuslerp_expected(0.5 / 0.8, base if with_base else None, m1, m2, flatten, row_wise))


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_endpoints_and_special_cases(with_base):
    base, m1, m2 = random_tensors(3, (8, 6), seed=35)
    inputs = [base, m1, m2] if with_base else [m1, m2]
    assert_exact(run_everywhere("nuslerp", inputs, None, weighted([1.0, 0.0])), m1)
    assert_exact(run_everywhere("nuslerp", inputs, None, weighted([0.0, 2.0])), m2)
    # weights summing to ~0: t = 0.5
    assert_exact(
        run_everywhere("nuslerp", inputs, None, weighted([1.0, -1.0])),
        run_method("nuslerp", inputs, None, None, weighted([1.0, 1.0])),
    )


@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_AXES)
def test_nuslerp_colinear_and_zero_vectors(flatten, row_wise):
    m1 = random_tensors(1, (8, 6), seed=36)[0]
    values = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    colinear = run_everywhere("nuslerp", [m1, 2.5 * m1], values, weighted([0.75, 0.25]))
    assert_tight(colinear, 0.75 * m1.double() + 0.25 * 2.5 * m1.double())
    zero = run_everywhere("nuslerp", [torch.zeros_like(m1), m1], values, weighted([0.75, 0.25]))
    assert_tight(zero, math.sin(0.25 * math.pi / 2) * m1.double())


# --------------------------------------------------------------------------------------------------------------------
# multislerp
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp(shape, count, with_base, normalize):
    base, *models = random_tensors(count + 1, shape, seed=37)
    weights = [0.5, 0.2, 0.9, 0.4][:count]
    inputs = [base, *models] if with_base else models
    values = {"normalize_weights": normalize}
    out = run_everywhere("multislerp", inputs, values, weighted(weights))
    assert_tight(out, ref_multislerp(models, weights, base if with_base else None, normalize))


def test_multislerp_tangent_step_is_zero():
    """The closed form is the exact value: the faithful construction's tangent sum vanishes to float64 rounding."""
    base, *models = random_tensors(4, (30, 20), seed=38)
    full = ref_multislerp(models, [0.2, 0.3, 0.5], base)
    assert_tight(run_method("multislerp", [base, *models], None, None, weighted([0.2, 0.3, 0.5])), full)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_single_model_and_fallbacks(with_base):
    base, m1 = (t.mul(8).round().div(8) for t in random_tensors(2, (8, 6), seed=39))
    prefix = [base] if with_base else []
    assert_exact(run_everywhere("multislerp", [*prefix, m1], None, weighted([0.4])), m1)
    opposite = (2 * base - m1) if with_base else -m1  # exactly the opposite delta: eighths add without rounding
    fallback = run_everywhere("multislerp", [*prefix, m1, opposite], None, weighted([1.0, 1.0]))
    assert_tight(fallback, base.double() if with_base else torch.zeros_like(m1))
    if with_base:  # every delta zero, three models: mergekit raises, mergebot returns the base
        assert_exact(run_everywhere("multislerp", [base, base, base, base], None, weighted([1.0, 2.0, 3.0])), base)


def test_multislerp_checks_its_parameters():
    check = BUILTIN_METHODS["multislerp"].check
    values = dict(BUILTIN_METHODS["multislerp"].parameters)
    assert check(TensorParams("w", values, ({"weight": 0.5}, {"weight": 0.5}))) is None
    assert "sum to zero" in check(TensorParams("w", values, ({"weight": 0.5}, {"weight": -0.5})))
    assert check(TensorParams("w", {**values, "normalize_weights": False}, ({"weight": 1}, {"weight": -1}))) is None
    assert "eps" in check(TensorParams("w", {**values, "eps": 0.0}, ({"weight": 1}, {"weight": 1})))


# --------------------------------------------------------------------------------------------------------------------
# karcher
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("max_iter", [0, 1, 10, 100])
def test_karcher(shape, count, max_iter):
    tensors = random_tensors(count, shape, seed=40)
    tensors = [t * (1 + 0.5 * i) + 0.7 * tensors[0] for i, t in enumerate(tensors)]
    out = run_everywhere("karcher", tensors, {"max_iter": max_iter}, [{}] * count)
    assert_tight(out, ref_karcher(tensors, max_iter))


def test_karcher_with_a_base_counts_it_as_an_input():
    base, m1, m2 = random_tensors(3, (8, 6), seed=41)
    out = run_everywhere("karcher", [base, m1, m2], None, [{}, {}])
    assert_tight(out, ref_karcher([base, m1, m2]))


def test_karcher_degenerate_inputs():
    x, y = random_tensors(2, (8, 6), seed=42)
    zero = torch.zeros_like(x)
    assert_exact(run_everywhere("karcher", [x], None, [{}]), x)
    assert_exact(run_everywhere("karcher", [zero, zero], None, [{}, {}]), zero)
    # same direction, different norms: that direction at the mean norm
    assert_tight(run_everywhere("karcher", [x, 3 * x], None, [{}, {}]), 2 * x.double())
    # a zero input takes no part in the direction but counts in the norm
    assert_tight(run_everywhere("karcher", [x, y, zero], None, [{}] * 3), ref_karcher([x, y, zero]))
    # opposite inputs: the mean falls back to the first direction and the antipode adds no tangent
    assert_tight(run_everywhere("karcher", [x, -x], None, [{}, {}]), x.double())


def test_karcher_checks_its_parameters():
    check = BUILTIN_METHODS["karcher"].check
    assert check(TensorParams("w", {"max_iter": 10, "tol": 1e-5}, ())) is None
    assert "max_iter" in check(TensorParams("w", {"max_iter": 2.5, "tol": 1e-5}, ()))
    assert "max_iter" in check(TensorParams("w", {"max_iter": -1, "tol": 1e-5}, ()))
    assert "tol" in check(TensorParams("w", {"max_iter": 10, "tol": 0}, ()))


# --------------------------------------------------------------------------------------------------------------------
# nearswap and arcee_fusion
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.3, 1.5, 1e9])
def test_nearswap(shape, t):
    base, model = random_tensors(2, shape, seed=43)
    model = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(44)) < 0.2, base, model)
    out = run_everywhere("nearswap", [base, model], {"t": t}, [{}])
    assert_tight(out, ref_nearswap(base, model, t))
    if t == 0.0:
        assert_exact(out, base)
    if t == 1e9:
        assert_exact(out, model)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_arcee_fusion(shape, spread):
    base, delta = random_tensors(2, shape, seed=45)
    model = base + spread * delta * torch.linspace(0.1, 3.0, delta.numel()).reshape(shape)
    out = run_everywhere("arcee_fusion", [base, model], None, [{}])
    mask = fusion_mask(base, model)
    assert_exact(out, torch.where(mask, model, base))
    assert 0 < int(mask.sum()) < mask.numel()


def test_arcee_fusion_exact_quartiles_with_ties():
    """Many equal importances (quantized inputs): the exact order statistics still match the sorted reference."""
    generator = torch.Generator().manual_seed(46)
    base = torch.randint(-2, 3, (40, 9), generator=generator).float()
    model = base + torch.randint(-1, 2, (40, 9), generator=generator).float() * (torch.arange(40) % 3 == 0)[:, None]
    out = run_everywhere("arcee_fusion", [base, model], None, [{}])
    assert_exact(out, torch.where(fusion_mask(base, model), model, base))
    assert_exact(run_everywhere("arcee_fusion", [base, base], None, [{}]), base)


@pytest.mark.parametrize("method", ["model_stock", "nuslerp", "multislerp", "karcher", "arcee_fusion"])
def test_real_grid_is_independent_of_the_engine_blocks(method, monkeypatch):
    """At the real grid size: a tensor of several chunks, blocked as the engine does and at odd sizes."""
    monkeypatch.setattr(geometry, "GRID_ELEMENTS", 1 << 16)
    count = 1 if method == "arcee_fusion" else 2
    base, *models = random_tensors(count + 1, (700, 300), seed=47)
    per_model = weighted([0.4, 0.7][:count])
    outputs = [run_method(method, [base, *models], rows, None, per_model) for rows in (1, 97, 218, 500, None)]
    for out in outputs[:-1]:
        assert_exact(out, outputs[-1])


# --------------------------------------------------------------------------------------------------------------------
# Through the planner: optional base, model counts, parameter checks
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    base, m1, m2, m3 = write_models(tmp_path_factory.mktemp("geometric"), 3)
    return {"base": base, "m1": m1, "m2": m2, "m3": m3}


def merge_yaml(tmp_path: Path, text: str) -> tuple[int, Path]:
    config = tmp_path / "merge.yml"
    config.write_text("dtype: float32\n" + text)
    out = tmp_path / "out"
    return run_cli("merge", config, out), out


def models_yaml(*entries: str) -> str:
    return "models:\n" + "".join(f"  - model: {entry}\n" for entry in entries)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_runs_with_and_without_a_base(family, tmp_path, with_base):
    head = f"merge_method: nuslerp\nbase_model: {family['base']}\n" if with_base else "merge_method: nuslerp\n"
    code, out = merge_yaml(
        tmp_path,
        head + f"models:\n  - model: {family['m1']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family['m2']}\n    parameters: {{weight: 3}}\n",
    )
    assert code == 0
    base, m1, m2 = (load_tensors(family[k]) for k in ("base", "m1", "m2"))
    for name, tensor in load_tensors(out).items():
        assert_tight(tensor, nuslerp_expected(0.75, base[name] if with_base else None, m1[name], m2[name], True, False))


def test_karcher_with_base_model_merges_it_too(family, tmp_path):
    code, out = merge_yaml(
        tmp_path, f"merge_method: karcher\nbase_model: {family['base']}\n" + models_yaml(family["m1"], family["m2"])
    )
    assert code == 0
    inputs = [load_tensors(family[k]) for k in ("base", "m1", "m2")]
    for name, tensor in load_tensors(out).items():
        assert_tight(tensor, ref_karcher([t[name] for t in inputs]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: nearswap\nparameters: {{t: 0.1}}\n" + models_yaml("{m1}"), "base_model: required by"),
        ("merge_method: nuslerp\n" + models_yaml("{m1}", "{m2}", "{m3}"), "exactly 2"),
        ("merge_method: model_stock\nbase_model: {base}\n" + models_yaml("{m1}"), "at least 2"),
        (
            "merge_method: multislerp\nmodels:\n  - model: {m1}\n    parameters: {{weight: 1}}\n"
            "  - model: {m2}\n    parameters: {{weight: -1}}\n",
            "weights sum to zero",
        ),
        ("merge_method: karcher\nparameters: {{tol: 0}}\n" + models_yaml("{m1}", "{m2}"), "parameters.tol"),
    ],
)
def test_planner_refuses(family, tmp_path, capsys, text, message):
    code, out = merge_yaml(tmp_path, text.format(**family))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
