"""The fused loops give the same bytes as the torch methods they stand in for, and the engine uses them."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mergebot.dev.synthetic import make_model
from mergebot.merge.methods import BUILTIN_METHODS, RawBlocks, TensorParams
from tests.helpers import run_cli_process, tree_digest

OWN_TESTS = {"sce", "ram", "ramplus_tl", "model_stock", "nuslerp", "multislerp", "karcher", "nearswap"}
"""Fused methods with settings of their own, compared in test_kernels_geometric.py."""
SHAPE = (300, 700)
BLOCK_ROWS = 97
"""Blocks of 67,900 elements: not a multiple of the loops' 2,048, so spans and ranges straddle rows."""
FUSED = [name for name, method in BUILTIN_METHODS.items() if method.fused is not None and name not in OWN_TESTS]
"""The methods the tests below compare, from the registry: a new fused method is tested without listing it."""
HAVE_FUSED = {
    "linear", "slerp", "passthrough", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear",
}  # fmt: skip
"""Written out on purpose: a method that loses its fused path fails here instead of leaving the tests quietly."""


def test_no_method_lost_its_fused_loops():
    assert set(FUSED) >= HAVE_FUSED, f"no fused path any more: {sorted(HAVE_FUSED - set(FUSED))}"


def deltas_of(seed: int, models: int, dtype: torch.dtype, tied: bool = False) -> list[torch.Tensor]:
    """A base and fine-tunes. `tied`: every delta is one of a few values (many ties at any magnitude cut), and
    the second model's delta is minus the first's where the third's is zero (sign sums exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator)
    if tied:
        steps = torch.randint(-3, 4, (models, *SHAPE), generator=generator).to(torch.float32) * 0.0078125
        if models >= 3:
            steps[1] = torch.where(steps[2] == 0, -steps[0], steps[1])
        inputs = [base, *(base.to(torch.bfloat16).to(torch.float32) + step for step in steps)]
    else:
        inputs = [base, *(base + 0.01 * torch.randn(SHAPE, generator=generator) for _ in range(models))]
    return [tensor.to(dtype) for tensor in inputs]


def merged_both_ways(
    name: str, inputs: list[torch.Tensor], values: dict, per_model: list[dict], out_dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray]:
    method = BUILTIN_METHODS[name]
    params = TensorParams(
        "model.layers.0.mlp.up_proj.weight",
        {**method.parameters, **values},
        tuple({**method.model_parameters, **p} for p in per_model),
    )
    starts = range(0, SHAPE[0], BLOCK_ROWS)

    def float_blocks():
        return ((s, [t[s : s + BLOCK_ROWS].to(torch.float32) for t in inputs]) for s in starts)

    bits = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}
    as_bits = bits[inputs[0].dtype]

    def raw_blocks():
        for s in starts:
            rows = [t[s : s + BLOCK_ROWS].reshape(-1).view(as_bits[0]).numpy().view(as_bits[1]) for t in inputs]
            yield s, np.stack(rows)

    expected = torch.cat([block.to(out_dtype) for block in method.merge(float_blocks, params)])
    expected_bits = expected.reshape(-1).view(bits[out_dtype][0]).numpy().view(bits[out_dtype][1])
    raw = RawBlocks(raw_blocks, SHAPE, as_bits[1], bits[out_dtype][1])
    assert method.fused is not None
    return expected_bits, np.concatenate(list(method.fused(raw, params)))


WEIGHTED = [{"weight": 0.3, "density": 0.5}, {"weight": 0.5, "density": 0.3}, {"weight": 0.2, "density": 1.0}]


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
def test_fused_loops_give_the_torch_methods_bytes(name, tied):
    models = 1 if name == "slerp" else 3
    inputs = deltas_of(7, models, torch.bfloat16, tied)
    if name == "passthrough":
        inputs, values, per_model = inputs[1:2], {}, [{}]
    elif name == "slerp":
        values, per_model = {"t": 0.3}, [{}]
    elif name == "linear":
        inputs, values, per_model = inputs[1:], {}, [{"weight": w} for w in (0.2, 0.5, 0.3)]
    else:
        values = {"normalize": True}
        per_model = [{"weight": p["weight"]} for p in WEIGHTED] if name == "task_arithmetic" else WEIGHTED
    expected, fused = merged_both_ways(name, inputs, values, per_model, torch.bfloat16)
    assert fused.dtype == expected.dtype and fused.shape == expected.shape
    assert np.array_equal(fused, expected), f"{int((fused != expected).sum())} entries differ"


def test_tied_inputs_really_tie_at_the_cut_and_cancel_in_the_vote():
    """The `tied` case above exercises both rules the loops must follow exactly."""
    inputs = deltas_of(7, 3, torch.bfloat16, tied=True)
    deltas = [model.to(torch.float32) - inputs[0].to(torch.float32) for model in inputs[1:]]
    magnitudes = deltas[0].abs().reshape(-1)
    k = int(0.5 * magnitudes.numel())
    cut = torch.sort(magnitudes, descending=True).values[k - 1]
    assert int((magnitudes == cut).sum()) > int((magnitudes >= cut).sum()) - k > 0
    assert int(((deltas[0] + deltas[1] + deltas[2]) == 0).sum()) > 1000


@pytest.mark.parametrize(
    ("name", "values", "dtypes"),
    [
        ("ties", {"normalize": False, "lambda": 0.7, "rescale": True}, (torch.float32, torch.float32)),
        ("dare_linear", {"rescale": False, "seed": 3}, (torch.bfloat16, torch.float32)),
        ("breadcrumbs_ties", {"lambda": 1.5}, (torch.float32, torch.bfloat16)),
        ("linear", {"normalize": False}, (torch.float32, torch.float32)),
        ("passthrough", {}, (torch.float32, torch.bfloat16)),
    ],
)
def test_fused_loops_in_float32_and_with_other_settings(name, values, dtypes):
    inputs = deltas_of(11, 3, dtypes[0])
    if name == "linear":
        inputs = inputs[1:]
    if name == "passthrough":
        inputs = inputs[:1]
    per_model = [{"weight": 0.6, "density": 0.4, "gamma": 0.05}, {"weight": -0.2, "density": 0.9, "gamma": 0.0}]
    per_model.append({"weight": 0.5, "density": 0.2, "gamma": 0.1})
    if name == "linear":
        per_model = [{"weight": p["weight"]} for p in per_model]
    if name == "passthrough":
        per_model = []
    expected, fused = merged_both_ways(name, inputs, values, per_model, dtypes[1])
    assert np.array_equal(fused, expected), f"{int((fused != expected).sum())} entries differ"


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Models whose large tensors (embeddings, MLP) go through the fused loops, and whose norms do not."""
    root = tmp_path_factory.mktemp("wide")
    base = make_model(root / "base", hidden=128, intermediate=640, vocab=1024, layers=2, shard_size=400_000)
    return base, [make_model(root / f"ft{seed}", base=base, seed=seed) for seed in (1, 2)]


@pytest.mark.parametrize("method", ["ties", "slerp", "dare_ties", "breadcrumbs_ties", "della"])
def test_engine_output_is_the_same_with_one_thread_or_two(wide_models, tmp_path, method):
    base, tunes = wide_models
    if method == "slerp":
        extra = ["--base-model", str(base), str(tunes[0]), "--set", "t=0.4"]
    else:
        extra = ["--base-model", str(base), *(f"{tune}:0.5" for tune in tunes), "--set", "density=0.4"]
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"out-{threads}"
        env = os.environ | {"MERGEBOT_THREADS": threads}
        result = run_cli_process("merge", "--method", method, *extra, out, env=env)
        assert result.returncode == 0, result.stderr
        digests.append(tree_digest(out))
    assert digests[0] == digests[1]


def test_threads_setting_is_checked(wide_models, tmp_path):
    base, tunes = wide_models
    env = os.environ | {"MERGEBOT_THREADS": "many"}
    result = run_cli_process("merge", "--method", "linear", f"{base}:0.5", f"{tunes[0]}:0.5", tmp_path / "out", env=env)
    assert result.returncode == 2
    assert "MERGEBOT_THREADS: 'many' is not a positive whole number" in result.stderr


SPARSE = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize(
    "variant",
    [
        {"rescale": True, "densities": (0.01, 0.999, 0.5)},
        {"rescale": False, "densities": (0.2, 1.0, 0.7)},
        {"rescale": True, "densities": (0.9, 0.3, 0.05), "skewed": True},
    ],
    ids=["rescaled-extremes", "plain", "skewed-first-block"],
)
def test_every_sparse_method_and_variant_gives_the_torch_bytes(name, variant):
    """Densities at the tails (a cut among the largest 1%, one keeping all but 0.1%), a model kept whole, with and
    without rescaling; `skewed`: the first block's deltas are a hundredth of the rest's, so a cut guessed from it
    misses and the exact search must take over."""
    inputs = deltas_of(5, 3, torch.bfloat16)
    if variant.get("skewed"):
        base = inputs[0].to(torch.float32)
        for model in inputs[1:]:
            delta = model.to(torch.float32) - base
            delta[:BLOCK_ROWS] *= 0.01
            model.copy_((base + delta).to(torch.bfloat16))
    per_model = [
        {"weight": weight, "density": density, "gamma": 0.02, "epsilon": min(density, 1 - density, 0.1) / 2}
        for weight, density in zip((0.5, -0.3, 0.8), variant["densities"], strict=True)
    ]
    values = {"rescale": variant["rescale"], "normalize": name.endswith("ties") or name == "della"}
    expected, fused = merged_both_ways(name, inputs, values, per_model, torch.bfloat16)
    assert np.array_equal(fused, expected), f"{int((fused != expected).sum())} entries differ"


def test_the_guessed_window_finds_the_exact_cut_and_a_miss_falls_back():
    """The one pass around the sampled guess gives the same cut as the two histogram passes, for cuts from the
    top entry to the last; a first block unlike the rest makes the guess miss, and the exact search answers."""
    from mergebot.merge.methods.fused_topk import _Window, exact_cuts, top_cuts

    for tied, skewed in ((False, False), (True, False), (False, True)):
        inputs = deltas_of(9, 3, torch.bfloat16, tied=tied)
        if skewed:
            inputs[1][:BLOCK_ROWS] = inputs[0][:BLOCK_ROWS]
        starts = range(0, SHAPE[0], BLOCK_ROWS)

        def raw_blocks(inputs=inputs, starts=starts):
            for s in starts:
                yield s, np.stack([t[s : s + BLOCK_ROWS].reshape(-1).view(torch.int16).numpy() for t in inputs])

        blocks = RawBlocks(lambda raw_blocks=raw_blocks: (b for b in raw_blocks()), SHAPE, np.uint16, np.uint16)
        numel = SHAPE[0] * SHAPE[1]
        for k in (1, 7, numel // 100, numel // 2, numel - 5, numel):
            ks = [k, k, k]
            exact = [cut[:4] for cut in exact_cuts(blocks, [0, 1, 2], ks)]
            assert [cut[:4] for cut in top_cuts(blocks, [0, 1, 2], ks)] == exact, (tied, skewed, k)
            window = _Window(blocks, [0, 1, 2], ks, numel).count()
            if skewed and k == numel // 2:
                assert window[0] is None, "a first block unlike the rest should make the guess miss"
            if not skewed and k == numel // 2:
                assert all(cut is not None and cut[:4] == e for cut, e in zip(window, exact, strict=True))
