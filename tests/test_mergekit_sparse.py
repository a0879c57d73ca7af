"""breadcrumbs, breadcrumbs_ties, della, della_linear, sce, ram and ramplus_tl against mergekit 0.1.5 itself.

The same YAML file goes to `mergekit-yaml` and `mergebot merge` (see mergekit_reference). Deterministic methods are
compared tensor by tensor to float32 precision. DELLA draws its masks from torch's global generator in mergekit, so
it is compared exactly where nothing is pruned (density 1: the rest of the pipeline) and, where it prunes, by its
statistics: both keep each entry with the probability of its magnitude rank in its row, and both rescale what is
kept back to the delta's L1 norm.
"""

import json
import subprocess

import pytest
import torch

from mergebot.merge.methods import BUILTIN_METHODS
from tests.helpers import load_tensors
from tests.mergekit_reference import listed, mergekit_python, register

pytest_plugins = ["tests.mergekit_fixtures"]

HEADER = "dtype: float32\nbase_model: {base}\n"
"""Every config below: float32 output, the first synthetic model as the base."""


CONFIGS = {
    "breadcrumbs": "merge_method: breadcrumbs\nparameters: {{lambda: 1.2}}\n"
    + listed(
        ("m1", "weight: 0.7, density: 0.5, gamma: 0.05"),
        ("m2", "weight: 0.4, density: [0.3, 0.8]"),
        ("m3", "weight: 0.6, density: 1.0, gamma: 0.2"),
    ),
    "breadcrumbs_normalized_rescaled": "merge_method: breadcrumbs\nparameters: {{normalize: true, rescale: true}}\n"
    + listed(("m1", "weight: 0.7, density: 0.6"), ("m2", "weight: 0.4, density: 0.9, gamma: 0.15")),
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\n"
    "parameters: {{gamma: [{{filter: mlp, value: 0.02}}, {{value: 0.08}}]}}\n"
    + listed(
        ("m1", "weight: 0.7, density: 0.5, gamma: 0.1"),
        ("m2", "weight: 0.5, density: 0.7"),
        ("m3", "weight: 0.6, density: 0.4, gamma: 0.3"),
    ),
    "della_unpruned": "merge_method: della\nparameters: {{lambda: 0.9}}\n"
    + listed(("m1", "weight: 0.7, density: 1.0"), ("m2", "weight: 0.5, density: 1.0"), ("m3", "weight: 0.6")),
    "della_linear_unpruned": "merge_method: della_linear\n"
    + listed(("m1", "weight: 0.7"), ("m2", "weight: -0.3, epsilon: 0.3")),
    "sce": "merge_method: sce\nparameters: {{select_topk: 0.6}}\n" + listed("m1", "m2", "m3"),
    "sce_all": "merge_method: sce\n" + listed("m1", "m2"),
}
SPARSE_CONFIGS = {
    "ram": "merge_method: ram\n" + listed("m1", "m2", "m3"),
    "ramplus_tl": "merge_method: ramplus_tl\n"
    "parameters: {{r: 0.3, alpha: [{{filter: self_attn, value: 5.0}}, {{value: 0.2}}]}}\n" + listed("m1", "m2", "m3"),
}
DELLA_PRUNING = "merge_method: della_linear\n" + listed(("m1", "weight: 1.0, density: 0.4, epsilon: 0.3"))
register({"della_pruning": DELLA_PRUNING}, HEADER)  # compared by its statistics, below

SPEC_DUMP = """
import json, sys
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MISSING
specs = {}
for name in sys.argv[1:]:
    spec = registry.get(name).spec
    specs[name] = {
        "base": spec.contract.base.name,
        "parameters": [[p.name, p.scope.name, None if p.default is MISSING else p.default] for p in spec.parameters],
    }
print(json.dumps(specs))
"""
METHODS = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl"]


@pytest.mark.parametrize("case", register(CONFIGS, HEADER))
def test_matches_mergekit(case, mergekit, tmp_path):
    mergekit.run_both(case, tmp_path).assert_close()


@pytest.mark.parametrize("case", register(SPARSE_CONFIGS, HEADER, models="sparse"))
def test_ram_matches_mergekit(case, mergekit, tmp_path):
    mergekit.run_both(case, tmp_path).assert_close()


def test_della_pruning_has_mergekit_statistics(mergekit, tmp_path):
    """The fraction kept per rank of |delta| in its row (16 entries a row in these tensors; ranks pooled in fours)
    follows density − ε + 2ε·rank/15 in both programs, and both restore the delta's L1 norm."""
    outputs = mergekit.run_both("della_pruning", tmp_path)
    models = mergekit.models["dense"]
    base, model = load_tensors(models["base"]), load_tensors(models["m1"])
    expected = (0.4 - 0.3 + 0.6 * torch.arange(16) / 15).reshape(4, 4).mean(1)
    for merged in (outputs.mergekit, outputs.mergebot):
        kept_by_rank = torch.zeros(16)
        rows = 0
        for name, tensor in merged.items():
            delta = model[name] - base[name]
            pruned = tensor - base[name]
            torch.testing.assert_close(pruned.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
            if delta.dim() == 2 and delta.shape[1] == 16:
                ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1)
                kept_by_rank.scatter_add_(0, ranks.reshape(-1), (pruned != 0).reshape(-1).float())
                rows += delta.shape[0]
        assert rows > 1000
        # binomial standard deviation ≤ 0.008 per group of four ranks at > 1000 rows
        torch.testing.assert_close(kept_by_rank.reshape(4, 4).mean(1) / rows, expected, rtol=0, atol=0.04)


def test_parameters_and_defaults_are_mergekits():
    """Each method's parameter names, scopes (global or per model) and defaults, read from mergekit's registry; the
    base is required in both. mergebot adds only `seed` (DELLA's masks are seeded here, random in mergekit)."""
    python = mergekit_python()
    result = subprocess.run([python, "-c", SPEC_DUMP, *METHODS], capture_output=True, text=True, check=True)
    for name, spec in json.loads(result.stdout).items():
        method = BUILTIN_METHODS[name]
        assert spec["base"] == "REQUIRED" and method.uses_base and not method.optional_base, name
        shared = {p: default for p, scope, default in spec["parameters"] if scope == "SHARED"}
        per_model = {p: default for p, scope, default in spec["parameters"] if scope == "NON_BASE"}
        assert len(shared) + len(per_model) == len(spec["parameters"]), name
        assert {p: v for p, v in method.parameters.items() if p != "seed"} == shared, name
        assert dict(method.model_parameters) == per_model, name
        assert ("seed" in method.parameters) == name.startswith("della"), name
