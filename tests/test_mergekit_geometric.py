"""model_stock, nuslerp, multislerp, karcher, nearswap and arcee_fusion against mergekit 0.1.5 itself, on the same
YAML config (see mergekit_reference), with and without the optional base, and with per-layer gradients and filters.

All six are deterministic in mergekit for these tiny float32 models (arcee_fusion samples its quantiles at random
only above a million entries). mergebot works in float64 where mergekit works in float32, so the two agree to
float32 rounding, not bit for bit.
"""

import pytest

from tests.mergekit_reference import listed, register

pytest_plugins = ["tests.mergekit_fixtures"]


def weighted(*entries: tuple[str, str]) -> str:
    """A `models:` list giving each model a weight."""
    return listed(*((model, f"weight: {weight}") for model, weight in entries))


CONFIGS = {
    "model_stock": "merge_method: model_stock\nbase_model: {base}\n" + listed("m1", "m2", "m3"),
    "model_stock_filter_wise": (
        "merge_method: model_stock\nbase_model: {base}\nparameters: {{filter_wise: true}}\n" + listed("m1", "m2")
    ),
    "nuslerp": "merge_method: nuslerp\n" + weighted(("m1", "0.3"), ("m2", "[0.9, 0.2]")),
    "nuslerp_base_rows": (
        "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false}}\n"
        + weighted(("m1", "0.3"), ("m2", "0.6"))
    ),
    "nuslerp_base_columns": (
        "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n"
        + weighted(("m1", "0.7"), ("m2", "0.4"))
    ),
    "multislerp": "merge_method: multislerp\n" + weighted(("m1", "0.3"), ("m2", "0.6"), ("m3", "0.2")),
    "multislerp_base": (
        "merge_method: multislerp\nbase_model: {base}\nparameters: {{normalize_weights: false}}\n"
        + weighted(("m1", "0.5"), ("m2", "[0.1, 0.6]"), ("m3", "0.3"))
    ),
    "karcher": "merge_method: karcher\n" + listed("m1", "m2", "m3"),
    "karcher_base": (
        "merge_method: karcher\nbase_model: {base}\nparameters: {{max_iter: 3, tol: 1.0e-6}}\n" + listed("m1", "m2")
    ),
    "nearswap": (
        "merge_method: nearswap\nbase_model: {base}\n"
        "parameters:\n  t:\n    - filter: mlp\n      value: [0.002, 0.008]\n    - value: 0.004\n" + listed("m1")
    ),
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\n" + listed("base", "m1"),
}


@pytest.mark.parametrize("name", register(CONFIGS, "dtype: float32\n"))
def test_matches_mergekit(name, mergekit, tmp_path):
    outputs = mergekit.run_both(name, tmp_path)
    outputs.assert_close()
    print(f"{name}: max abs difference {outputs.max_abs_difference():.3g}")
