"""breadcrumbs, breadcrumbs_ties, della, della_linear, sce, ram and ramplus_tl against whole-tensor references.

As in test_methods.py, each method runs through `MergeMethod.merge` on row blocks of several sizes, and the
expectations are direct computations of the published (mergekit 0.1.5) definitions:

- breadcrumbs: of n entries sorted by |delta|, drop the lowest n − int(density·n) − int(γ·n) (at least 0), keep the
  next int(density·n), drop the rest (the largest outliers); then task arithmetic, or TIES for breadcrumbs_ties;
- della: keep each entry with probability density − ε + 2ε·r/(n − 1), r its ascending |delta| rank within its row
  (a 1-D tensor is one row), rescaled to the delta's L1 norm (mergekit 0.1.5's `rescale`, not the paper's 1/p);
- sce: mask the entries outside the top int(select_topk·nonzero) variances across models, weight model i by its
  mean squared (masked) delta over their sum (equal weights below 1e-6), erase the deltas that lose the TIES vote,
  divide by the agreeing weights (at least 1e-6);
- ram: an entry changed (|delta| > ε) by one model takes its delta, by several their mean; ramplus_tl scales model
  i's unique entries by 1 + r·clamp(shared_i / max(unique_i, ε), 0, α).
"""

import pytest
import torch

from mergebot.dev.synthetic import make_model
from mergebot.merge.methods import BUILTIN_METHODS, TensorParams
from tests.helpers import run_cli
from tests.test_methods import ROWS, assert_exact, assert_ref, random_tensors, ref_gta, run_method

SHAPES = [(10, 7), (13,)]


def descending_keep(delta: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """The entries ranked first..last−1 by |delta|, largest first (equal magnitudes: the first in flat order)."""
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[max(0, first) : max(0, last)]] = True
    return keep.reshape(delta.shape)


def breadcrumbs_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool)
    target = int(density * n)
    below = max(0, n - target - int(gamma * n))
    return descending_keep(delta, n - below - target, n - below)


def quantized(shape, seed: int) -> torch.Tensor:
    """Magnitudes 1..4 with random signs: many equal magnitudes at every cut."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(1, 5, shape, generator=generator).float()
    return magnitude * torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# breadcrumbs, breadcrumbs_ties
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("normalize", "rescale", "lam"), [(False, False, 1.0), (True, True, 0.7)])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_breadcrumbs(method, shape, normalize, rescale, lam, tied, rows):
    base, *models = random_tensors(4, shape, seed=30)
    if tied:  # a zero base keeps the deltas exactly tied
        base, models = torch.zeros(shape), [quantized(shape, seed) for seed in (31, 32, 33)]
    weights = [0.8, 0.5, -0.3]
    settings = [(0.5, 0.1), (0.7, 0.01), (1.0, 0.3)]
    per_model = [{"weight": w, "density": d, "gamma": g} for w, (d, g) in zip(weights, settings, strict=True)]
    values = {"normalize": normalize, "rescale": rescale, "lambda": lam}
    out = run_method(method, [base, *models], rows, values, per_model)
    masks = [breadcrumbs_keep(m - base, d, g) for m, (d, g) in zip(models, settings, strict=True)]
    options = {"normalize": normalize, "lam": lam, "random_masks": masks, "rescale": rescale}
    assert_ref(out, ref_gta(base, models, weights, consensus=method == "breadcrumbs_ties", **options))
    assert_exact(out, run_method(method, [base, *models], None, values, per_model))


@pytest.mark.parametrize(
    ("density", "gamma", "kept_ranks"),
    [
        (0.5, 0.1, (10, 60)),  # the 10 largest are outliers, the next 50 are kept
        (0.5, 0.0, (0, 50)),  # no outliers: plain top-k
        (0.8, 0.5, (20, 100)),  # density + γ > 1: fewer outliers dropped, so 80 still fit
        (0.3, -0.1, (0, 20)),  # a negative γ pushes the band past the largest: only 20 fit (as mergekit's slice)
        (0.004, 0.0, (0, 0)),  # int(density · n) = 0: nothing kept (unlike TIES's at-least-one)
    ],
)
@pytest.mark.parametrize("rows", [1, 3, None])
def test_breadcrumbs_band(density, gamma, kept_ranks, rows):
    base = torch.zeros(10, 10)
    delta = (torch.randperm(100, generator=torch.Generator().manual_seed(34)).float() + 1).reshape(10, 10)
    per_model = [{"weight": 1.0, "density": density, "gamma": gamma}]
    out = run_method("breadcrumbs", [base, delta], rows, {}, per_model)
    first, last = kept_ranks
    assert_exact(out, delta * descending_keep(delta, first, last))


@pytest.mark.parametrize("rows", ROWS)
def test_breadcrumbs_ties_without_outliers_is_ties(rows):
    base, *models = random_tensors(3, (10, 7), seed=35)
    per_model = [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.7}]
    values = {"normalize": True}
    crumbs = run_method("breadcrumbs_ties", [base, *models], rows, values, [{**p, "gamma": 0.0} for p in per_model])
    assert_exact(crumbs, run_method("ties", [base, *models], rows, values, per_model))


# --------------------------------------------------------------------------------------------------------------------
# della, della_linear
# --------------------------------------------------------------------------------------------------------------------

DELLA = ["della", "della_linear"]


def della_masks(method: str, models: list[torch.Tensor], settings, seed: int, rows: int | None) -> list:
    """Read back each model's keep-mask: zero base, weight 1 for that model and 0 for the others, no rescale."""
    base = torch.zeros_like(models[0])
    masks = []
    for index in range(len(models)):
        per_model = [{"weight": float(j == index), "density": d, "epsilon": e} for j, (d, e) in enumerate(settings)]
        values = {"normalize": False, "rescale": False, "seed": seed}
        out = run_method(method, [base, *models], rows, values, per_model)
        assert torch.equal(out[out != 0], models[index][out != 0])
        masks.append(out != 0)
    return masks


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("normalize", "rescale"), [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("rows", ROWS)
def test_della(method, shape, normalize, rescale, rows):
    base, *models = random_tensors(4, shape, seed=40)
    weights = [0.6, 0.9, -0.4]
    settings = [(0.5, 0.2), (0.3, 0.1), (1.0, 0.15)]
    per_model = [{"weight": w, "density": d, "epsilon": e} for w, (d, e) in zip(weights, settings, strict=True)]
    values = {"normalize": normalize, "lambda": 0.8, "rescale": rescale, "seed": 7}
    out = run_method(method, [base, *models], rows, values, per_model)
    # the masks do not depend on the base or the weights, only on each delta, its model index and the seed
    masks = della_masks(method, [m - base for m in models], settings, seed=7, rows=rows)
    assert bool(masks[2].all())
    options = {"normalize": normalize, "lam": 0.8, "random_masks": masks, "rescale": rescale}
    assert_ref(out, ref_gta(base, models, weights, consensus=method == "della", **options))
    assert_exact(out, run_method(method, [base, *models], None, values, per_model))


@pytest.mark.parametrize(("method", "dare"), [("della", "dare_ties"), ("della_linear", "dare_linear")])
@pytest.mark.parametrize("rows", [1, None])
def test_della_with_zero_epsilon_is_dare(method, dare, rows):
    """ε = 0 keeps every entry with probability `density`: DARE's draws with the same seed."""
    base, *models = random_tensors(3, (10, 7), seed=41)
    per_model = [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.7}]
    values = {"normalize": True, "rescale": True, "seed": 3}
    della = run_method(method, [base, *models], rows, values, [{**p, "epsilon": 0.0} for p in per_model])
    assert_exact(della, run_method(dare, [base, *models], rows, values, per_model))


def kept_fraction_by_rank(masks: list[torch.Tensor], ranks: torch.Tensor, groups: int) -> torch.Tensor:
    kept = torch.stack([mask.reshape(-1) for mask in masks]).float().mean(0)
    return torch.zeros(groups).scatter_add_(0, ranks.reshape(-1), kept) / (ranks.numel() / groups)


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.3), (0.2, 0.15), (0.8, 0.1)])
def test_della_keep_probability_rises_with_rank_in_row(method, density, epsilon):
    """Pooled over 2000 rows of 10, rank r (0 = smallest |delta| of its row) is kept with density − ε + 2ε·r/9."""
    (delta,) = random_tensors(1, (2000, 10), seed=42)
    (mask,) = della_masks(method, [delta], [(density, epsilon)], seed=1, rows=None)
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1)
    expected = density - epsilon + 2 * epsilon * torch.arange(10) / 9
    # binomial standard deviation ≤ 0.011 per rank at 2000 rows
    torch.testing.assert_close(kept_fraction_by_rank([mask], ranks, 10), expected, rtol=0, atol=0.045)


@pytest.mark.parametrize("rows", [997, None])
def test_della_ranks_a_vector_as_one_row(rows):
    """A 1-D tensor is one row (as in mergekit): pooled in tenths of its ranks, the same linear rise; every block
    size gives the same mask."""
    (delta,) = random_tensors(1, (20000,), seed=43)
    masks = della_masks("della_linear", [delta], [(0.5, 0.4)], seed=2, rows=rows)
    assert_exact(masks[0], della_masks("della_linear", [delta], [(0.5, 0.4)], seed=2, rows=None)[0])
    tenth = torch.argsort(torch.argsort(delta.abs())) * 10 // delta.numel()
    expected = 0.5 - 0.4 + 0.8 * (torch.arange(10) + 0.5) / 10
    torch.testing.assert_close(kept_fraction_by_rank(masks, tenth, 10), expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize("rows", [3, None])
def test_della_rescale_restores_the_l1_norm(method, rows):
    """What is kept is scaled by one factor that restores the L1 norm; over seeds each entry is kept with its rank
    probability, so the rescaled delta's mean over seeds follows the delta's sign and shape."""
    base = torch.zeros(10, 12)
    (delta,) = random_tensors(1, (10, 12), seed=44)
    per_model = [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}]
    runs = []
    for seed in range(60):
        values = {"normalize": False, "rescale": True, "seed": seed}
        out = run_method(method, [base, delta], rows, values, per_model)
        kept = out != 0
        assert_ref(out, delta * kept * (delta.abs().sum() / delta[kept].abs().sum()))
        assert_ref(out.abs().sum(), delta.abs().sum())
        runs.append(out)
    assert (torch.stack(runs).mean(0) * delta > 0).all()


@pytest.mark.parametrize("method", DELLA)
def test_della_seeded_and_independent_per_model_and_tensor(method):
    (delta,) = random_tensors(1, (20, 10), seed=45)
    settings = [(0.5, 0.2), (0.5, 0.2)]
    first, second = della_masks(method, [delta, delta], settings, seed=0, rows=None)
    assert not torch.equal(first, second)
    assert not torch.equal(first, della_masks(method, [delta, delta], settings, seed=1, rows=None)[0])
    per_model = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]
    other = run_method(method, [torch.zeros(20, 10), delta], None, {"rescale": False}, per_model, "lm_head.weight")
    assert not torch.equal(first, other != 0)


def test_della_row_of_one_entry_keeps_density():
    """mergekit's rank scaling divides 0 by 0 for a one-entry row; here it is kept with probability `density`."""
    (delta,) = random_tensors(1, (4000, 1), seed=46)
    (mask,) = della_masks("della_linear", [delta], [(0.3, 0.2)], seed=0, rows=1000)
    assert abs(mask.float().mean().item() - 0.3) < 0.03


@pytest.mark.parametrize("method", DELLA)
@pytest.mark.parametrize(
    ("density", "epsilon", "refused"),
    [(0.5, 0.15, False), (0.9, 0.15, True), (0.1, 0.1, True), (0.1, 0.09, False), (1.0, 0.9, False)],
)
def test_della_refuses_epsilon_beyond_the_unit_interval(method, density, epsilon, refused):
    fine = {"weight": 1.0, "density": 0.5, "epsilon": 0.1}
    per_model = (fine, fine, {"weight": 1.0, "density": density, "epsilon": epsilon})
    problem = BUILTIN_METHODS[method].check(TensorParams("model.norm.weight", {}, per_model))
    assert problem is None if not refused else problem.startswith("parameters.epsilon") and "model 3" in problem


def test_della_epsilon_is_refused_before_merging(tmp_path, capsys):
    base = make_model(tmp_path / "base", hidden=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    other = make_model(tmp_path / "other", base=base, seed=1)
    args = ("--method", "della", "--base-model", base, f"{other}:1", "--set", "density=0.9", tmp_path / "out")
    assert run_cli("merge", *args) == 2
    assert "parameters.epsilon: 0.15 with density 0.9" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# sce
# --------------------------------------------------------------------------------------------------------------------


def ref_sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    deltas = torch.stack([m - base for m in models])
    if select_topk < 1.0:
        variance = deltas.var(0, unbiased=False)
        k = int(int((variance != 0).sum()) * select_topk)
        deltas = deltas * descending_keep(variance, 0, k)
    means = deltas.square().reshape(len(models), -1).mean(1)
    weights = torch.full_like(means, 1 / len(models)) if means.sum() < 1e-6 else means / means.sum()
    weights = weights.reshape(-1, *([1] * base.dim()))
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agreeing = weights * (deltas.sign() == majority)
    return base + (deltas * agreeing).sum(0) / agreeing.sum(0).clamp(min=1e-6)


def run_sce(tensors: list[torch.Tensor], rows: int | None, select_topk: float) -> torch.Tensor:
    return run_method("sce", tensors, rows, {"select_topk": select_topk}, [{}] * (len(tensors) - 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("rows", ROWS)
def test_sce(shape, count, select_topk, rows):
    base, *models = random_tensors(count + 1, shape, seed=50)
    models = [base + (m - base) * scale for m, scale in zip(models, (0.5, 1.0, 2.0), strict=False)]
    out = run_sce([base, *models], rows, select_topk)
    assert_ref(out, ref_sce(base, models, select_topk))
    assert_exact(out, run_sce([base, *models], None, select_topk))


@pytest.mark.parametrize(
    ("case", "select_topk"), [("one_model", 0.5), ("no_selection", 0.0), ("tiny", 1.0), ("tied", 0.5)]
)
@pytest.mark.parametrize("rows", [1, None])
def test_sce_edge_cases(case, select_topk, rows):
    """One model has no variance, so a selection keeps nothing (mergekit's too); select_topk 0 keeps nothing; tiny
    deltas get equal weights; equal magnitudes and all-zero entries give no NaN."""
    base, *models = random_tensors(3, (10, 7), seed=51)
    if case == "one_model":
        models = models[:1]
    if case == "tiny":
        models = [base + (m - base) * 1e-4 for m in models]
    if case == "tied":
        base = torch.zeros(10, 7)
        models = [quantized((10, 7), 52) * (quantized((10, 7), 54) > 0), quantized((10, 7), 53)]
    out = run_sce([base, *models], rows, select_topk)
    assert torch.isfinite(out).all()
    assert_ref(out, ref_sce(base, models, select_topk))
    if case in ("one_model", "no_selection"):
        assert_exact(out, base)


# --------------------------------------------------------------------------------------------------------------------
# ram, ramplus_tl
# --------------------------------------------------------------------------------------------------------------------


def sparse_models(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """Fine-tunes that leave about half of the entries exactly as in the base (different places per model)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        base + torch.randn(base.shape, generator=generator) * (torch.rand(base.shape, generator=generator) < 0.5)
        for _ in range(count)
    ]


def ref_ram(base, models, epsilon, r=None, alpha=None):
    deltas = torch.stack([m - base for m in models])
    changed = deltas.abs() > epsilon
    count = changed.sum(0)
    unique, overlap = count == 1, count > 1
    scales = torch.ones(len(models))
    if r is not None:
        for i in range(len(models)):
            shared_i, unique_i = int((changed[i] & overlap).sum()), int((changed[i] & unique).sum())
            divisor = max(unique_i, epsilon)
            scales[i] = 1 + r * min(max(shared_i / divisor if divisor > 0 else 0.0, 0.0), alpha)
    scales = scales.reshape(-1, *([1] * base.dim()))
    kept = deltas * changed
    return base + (kept * unique * scales + kept * overlap / count.clamp(min=1)).sum(0)


def run_ram(method: str, tensors: list[torch.Tensor], rows: int | None, values: dict) -> torch.Tensor:
    return run_method(method, tensors, rows, values, [{}] * (len(tensors) - 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
@pytest.mark.parametrize("rows", ROWS)
def test_ram(shape, count, epsilon, rows):
    base, *_ = random_tensors(1, shape, seed=60)
    models = sparse_models(base, count, seed=61)
    out = run_ram("ram", [base, *models], rows, {"epsilon": epsilon})
    assert_ref(out, ref_ram(base, models, epsilon))
    assert_exact(out, run_ram("ram", [base, *models], None, {"epsilon": epsilon}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.5, 3.0, 1e-5), (0.3, 10.0, 0.0)])
@pytest.mark.parametrize("rows", ROWS)
def test_ramplus_tl(shape, r, alpha, epsilon, rows):
    base, *_ = random_tensors(1, shape, seed=62)
    models = sparse_models(base, 3, seed=63)
    values = {"r": r, "alpha": alpha, "epsilon": epsilon}
    out = run_ram("ramplus_tl", [base, *models], rows, values)
    assert_ref(out, ref_ram(base, models, epsilon, r, alpha))
    assert_exact(out, run_ram("ramplus_tl", [base, *models], None, values))


@pytest.mark.parametrize("epsilon", [1e-5, 0.0])
@pytest.mark.parametrize("rows", [1, None])
def test_ramplus_tl_model_without_unique_entries(epsilon, rows):
    """A model whose every change is shared has no unique entry to scale: no 0/0, the shared mean as in RAM."""
    base, *_ = random_tensors(1, (10, 7), seed=64)
    first, second = sparse_models(base, 2, seed=65)
    values = {"r": 0.5, "alpha": 1.0, "epsilon": epsilon}
    out = run_ram("ramplus_tl", [base, first, first, second], rows, values)
    assert torch.isfinite(out).all()
    assert_ref(out, ref_ram(base, [first, first, second], epsilon, 0.5, 1.0))


def test_ram_by_hand():
    base = torch.zeros(1, 4)
    first = torch.tensor([[2.0, 4.0, 0.0, 0.0]])
    second = torch.tensor([[0.0, -2.0, 0.0, 6.0]])
    assert_exact(run_ram("ram", [base, first, second], None, {}), torch.tensor([[2.0, 1.0, 0.0, 6.0]]))
    # each model: one unique and one shared entry, so rho = 1, clamped to alpha 0.5: unique entries × 1.25
    values = {"r": 0.5, "alpha": 0.5}
    assert_exact(run_ram("ramplus_tl", [base, first, second], None, values), torch.tensor([[2.5, 1.0, 0.0, 7.5]]))


GTA, WEIGHTED = {"lambda": 1.0, "int8_mask": False}, {"weight": None, "density": 1.0}
DEFAULTS = {  # mergekit 0.1.5's registry: breadcrumbs_ties does not normalize by default, unlike ties
    "breadcrumbs": ({**GTA, "normalize": False, "rescale": False}, {**WEIGHTED, "gamma": 0.01}),
    "breadcrumbs_ties": ({**GTA, "normalize": False, "rescale": False}, {**WEIGHTED, "gamma": 0.01}),
    "della": ({**GTA, "normalize": True, "rescale": True, "seed": 0}, {**WEIGHTED, "epsilon": 0.15}),
    "della_linear": ({**GTA, "normalize": False, "rescale": True, "seed": 0}, {**WEIGHTED, "epsilon": 0.15}),
    "sce": ({"select_topk": 1.0, "int8_mask": False}, {}),
    "ram": ({"epsilon": 1e-5}, {}),
    "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
}


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_defaults(method):
    spec = BUILTIN_METHODS[method]
    assert spec.uses_base and not spec.optional_base
    assert (dict(spec.parameters), dict(spec.model_parameters)) == DEFAULTS[method]
