"""Every decoder architecture transformers lays out merges: tiny random checkpoints that transformers builds from its
own config classes (22 architectures, three of them MoE and two vision-language), each with two seeded fine-tunes,
merged with linear, TIES and a per-layer weight list. Each output loads with no missing, unexpected or mismatched
keys, gives finite logits, and holds exactly the values its config asks for, layer by layer."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mergebot.merge.layout import DEPTH_KEYS
from tests.helpers import load_tensors, read_json, run_cli
from tests.tiny_architectures import ARCHITECTURES, Architecture, assert_loads, build, fine_tune

NAMES = sorted(ARCHITECTURES)
LINEAR = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
"""
TIES = """merge_method: ties
base_model: {base}
parameters: {{weight: 0.5}}
models:
  - model: {a}
    parameters: {{density: 0.5}}
  - model: {b}
"""
WEIGHT_LISTS = """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {b}
    parameters: {{weight: [0.8, 0.2]}}
"""
PASSTHROUGH = """merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 3]
"""
"""Five layers: a's three, then b's layers 1 and 2."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: a base and two fine-tunes of it ("a", "b"), built once for the module."""
    root = tmp_path_factory.mktemp("architectures")
    built = {}
    for name, architecture in ARCHITECTURES.items():
        base = build(architecture, root / name / "base")
        built[name] = {
            "base": base,
            "a": fine_tune(base, root / name / "a", 1),
            "b": fine_tune(base, root / name / "b", 2),
        }
    return built


def merge(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "merge.yml"
    config.write_text(text)
    out = tmp_path / "out"
    assert run_cli("merge", config, out) == 0
    return out


def layer_t(name: str, architecture: Architecture) -> tuple[str, float]:
    """Which stack a tensor is in, and its t: layer / (layers − 1) within its own stack, 0 outside any stack."""
    for stack, prefix, depth in [
        ("decoder", architecture.decoder, architecture.layers),
        ("vision", architecture.vision, architecture.vision_layers),
    ]:
        if prefix and name.startswith(prefix):
            index = int(name[len(prefix) :].split(".")[0])
            return f"{stack}.{index}", index / (depth - 1)
    return "loose", 0.0


Inputs = dict[str, dict[str, torch.Tensor]]


def assert_every_tensor(out: Path, models: dict[str, Path], expected: Callable[[str, Inputs], torch.Tensor]) -> None:
    """The output has exactly the base's tensors, each equal to `expected(name, every input's tensors by role)`."""
    inputs = {role: load_tensors(path) for role, path in models.items()}
    merged = load_tensors(out)
    assert sorted(merged) == sorted(inputs["base"])
    for name, value in merged.items():
        torch.testing.assert_close(value, expected(name, inputs), msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_linear_is_the_weighted_average_of_every_tensor(checkpoints, tmp_path, name):
    models = checkpoints[name]
    out = merge(tmp_path, LINEAR.format(**models))
    assert_every_tensor(out, models, lambda n, inputs: 0.3 * inputs["a"][n] + 0.7 * inputs["b"][n])
    base_config = read_json(models["base"] / "config.json")
    for key in DEPTH_KEYS:
        assert read_json(out / "config.json").get(key) == base_config.get(key)
    assert_loads(out, ARCHITECTURES[name].layers)


def ties_reference(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TIES as mergekit defines it, for a trimmed to its top half by magnitude and b kept whole, weights 0.5:
    elect the sign of the weighted sum (0 counts as +), average the agreeing deltas over their weights."""
    delta_a, delta_b = a - base, b - base
    k = max(1, int(0.5 * delta_a.numel()))
    threshold = delta_a.abs().flatten().kthvalue(delta_a.numel() - k + 1).values
    trimmed = torch.where(delta_a.abs() >= threshold, delta_a, 0.0)
    elected = torch.where(0.5 * trimmed + 0.5 * delta_b >= 0, 1.0, -1.0)
    keep_a = ((trimmed != 0) & (trimmed.sign() == elected)).float()
    keep_b = (delta_b.sign() == elected).float()
    weight = 0.5 * keep_a + 0.5 * keep_b
    return base + torch.where(weight > 0, (0.5 * trimmed * keep_a + 0.5 * delta_b * keep_b) / weight, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_ties_trims_elects_and_averages_every_tensor(checkpoints, tmp_path, name):
    models = checkpoints[name]
    out = merge(tmp_path, TIES.format(**models))
    assert_every_tensor(out, models, lambda n, inputs: ties_reference(*(inputs[r][n] for r in ("base", "a", "b"))))
    assert_loads(out, ARCHITECTURES[name].layers)


@pytest.mark.parametrize("name", NAMES)
def test_a_weight_list_reaches_every_layer_of_every_stack(checkpoints, tmp_path, name):
    """weight [0.2, 0.8] and [0.8, 0.2]: a's share is 0.2 at the first layer, 0.8 at the last, in between at the
    others, over the decoder's depth and, separately, the vision tower's; 0.2 outside the layers."""
    architecture, models = ARCHITECTURES[name], checkpoints[name]
    out = merge(tmp_path, WEIGHT_LISTS.format(**models))
    seen = set()

    def expected(tensor: str, inputs: Inputs) -> torch.Tensor:
        where, t = layer_t(tensor, architecture)
        seen.add(where)
        share = 0.2 + 0.6 * t
        return share * inputs["a"][tensor] + (1 - share) * inputs["b"][tensor]

    assert_every_tensor(out, models, expected)
    expected = {f"decoder.{i}" for i in range(architecture.layers)} | {
        f"vision.{i}" for i in range(architecture.vision_layers)
    }
    assert seen == expected | {"loose"}
    assert_loads(out, architecture.layers)


@pytest.mark.parametrize("name", ["gpt2", "falcon", "qwen2", "mixtral"])
def test_passthrough_writes_the_layer_count_under_the_architectures_own_key(checkpoints, tmp_path, name):
    """Five layers from two slices: config.json counts them under its own key (n_layer for GPT-2), per-layer
    settings (layer_types) follow, and output layer 3 is b's layer 1."""
    architecture, models = ARCHITECTURES[name], checkpoints[name]
    out = merge(tmp_path, PASSTHROUGH.format(**models))
    config, base_config = read_json(out / "config.json"), read_json(models["base"] / "config.json")
    key = next(k for k in DEPTH_KEYS if k in base_config)
    assert config[key] == 5
    if "layer_types" in base_config:
        assert config["layer_types"] == base_config["layer_types"][:3] + base_config["layer_types"][1:3]
    merged, b = load_tensors(out), load_tensors(models["b"])
    prefix = architecture.decoder
    layer_3 = {t.removeprefix(f"{prefix}3"): v for t, v in merged.items() if t.startswith(f"{prefix}3.")}
    assert layer_3
    for suffix, value in layer_3.items():
        assert torch.equal(value, b[f"{prefix}1{suffix}"]), suffix
    assert_loads(out, 5)


def test_slices_of_a_vision_language_model_are_refused(checkpoints, tmp_path, capsys):
    models = checkpoints["llava"]
    config = tmp_path / "merge.yml"
    config.write_text(PASSTHROUGH.format(**models))
    assert run_cli("merge", config, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert f"{config}: slices:" in error and "vision_tower.encoder.layers.N" in error
    assert not (tmp_path / "out").exists()


def test_a_config_depth_that_fits_no_layers_is_refused(checkpoints, tmp_path, capsys):
    """A config.json that says 4 layers over tensors of 3 would give a model that loads with missing weights."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["gpt2"]["a"], broken)
    config = read_json(broken / "config.json")
    (broken / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    code = run_cli("merge", "--method", "linear", f"{checkpoints['gpt2']['b']}:1", f"{broken}:1", tmp_path / "out")
    assert code == 2
    error = capsys.readouterr().err
    assert f"model {broken}: config.json n_layer is 4" in error and "transformer.h.N (3)" in error


def test_every_decoder_config_class_counts_its_layers_under_a_known_key():
    """The layer-count names mergebot reads are the ones transformers' config classes map num_hidden_layers to
    (encoder-decoder families, whose num_hidden_layers counts the encoder, are not decoder stacks)."""
    keys = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type in CONFIG_MAPPING:
            keys[model_type] = (CONFIG_MAPPING[model_type].attribute_map or {}).get(
                "num_hidden_layers", "num_hidden_layers"
            )
    assert len(keys) > 100
    assert {
        model_type for model_type, key in keys.items() if key not in DEPTH_KEYS and key != "encoder_layers"
    } == set()
