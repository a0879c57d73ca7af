"""mergebot's original methods against mergekit 0.1.5 itself, on the same YAML config (see mergekit_reference).

dare_ties and dare_linear are left out: mergekit draws their masks from torch's global generator, so no two runs
agree; their statistics are tested in test_methods.py.
"""

import pytest

from tests.mergekit_reference import named_models, run_both

CONFIGS = {
    "linear": """
merge_method: linear
dtype: float32
models:
  - model: {m1}
    parameters: {{weight: 0.6}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.45}}
""",
    "slerp": """
merge_method: slerp
dtype: float32
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.7]
    - value: 0.35
""",
    "task_arithmetic": """
merge_method: task_arithmetic
dtype: float32
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: -0.3}}
  - model: {m3}
    parameters: {{weight: 0.5}}
parameters:
  lambda: 0.9
""",
    "ties": """
merge_method: ties
dtype: float32
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {m2}
    parameters: {{weight: 0.5, density: [0.3, 0.8]}}
  - model: {m3}
    parameters: {{weight: 0.6, density: 1.0}}
parameters:
  lambda: 1.1
""",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return named_models(tmp_path_factory.mktemp("models"), 3)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_matches_mergekit(method, models, tmp_path):
    outputs = run_both(CONFIGS[method].format(**models), tmp_path)
    outputs.assert_close()
