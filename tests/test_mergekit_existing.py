"""mergebot's original methods against mergekit 0.1.5 itself, on the same YAML config (see mergekit_reference).

dare_ties and dare_linear are left out: mergekit draws their masks from torch's global generator, so no two runs
agree; their statistics are tested in test_methods.py.
"""

import pytest

from tests.mergekit_reference import listed, register

pytest_plugins = ["tests.mergekit_fixtures"]

CONFIGS = {
    "linear": "merge_method: linear\n" + listed(("m1", "weight: 0.6"), ("m2", "weight: 0.3"), ("m3", "weight: 0.45")),
    "slerp": "merge_method: slerp\nbase_model: {base}\n"
    "parameters: {{t: [{{filter: self_attn, value: [0.1, 0.7]}}, {{value: 0.35}}]}}\n" + listed("base", "m1"),
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.9}}\n"
    + listed(("m1", "weight: 0.7"), ("m2", "weight: -0.3"), ("m3", "weight: 0.5")),
    "ties": "merge_method: ties\nbase_model: {base}\nparameters: {{lambda: 1.1}}\n"
    + listed(
        ("m1", "weight: 0.7, density: 0.4"),
        ("m2", "weight: 0.5, density: [0.3, 0.8]"),
        ("m3", "weight: 0.6, density: 1.0"),
    ),
}


@pytest.mark.parametrize("method", register(CONFIGS, "dtype: float32\n"))
def test_matches_mergekit(method, mergekit, tmp_path):
    mergekit.run_both(method, tmp_path).assert_close()
