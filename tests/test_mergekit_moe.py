"""mergekit-moe 0.1.5 as the reference: the same config built by `mergekit-moe` and by mergebot, tensors compared.

Every tensor is bit for bit equal: those copied from a model (attention, embeddings, experts, residual-scaled
down_proj), and a `cheap_embed` router, which both compute with the same float32 reductions in the same order (so
also after rounding to bfloat16); a random router has the same names, shapes and dtypes (mergekit's draws are
unseeded). The config.json of
Mixtral and Qwen MoE loads in transformers to the same config; DeepSeek's (a remote-code model) has the same fields.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mergebot.config.moe import load_moe_config
from mergebot.merge.moe import run_moe
from mergebot.pipeline.inputs import resolve_inputs
from tests.helpers import load_tensors
from tests.mergekit_reference import mergekit_python, write_models

DRIVER = Path(__file__).resolve().parent / "mergekit_moe_driver.py"
EXPERTS = """\
experts:
  - source_model: {m1}
    positive_prompts: ["the cat sat on the mat"]
    negative_prompts: ["one two three"]
  - source_model: {m2}
    positive_prompts: ["one two three four", "five six"]
    residual_scale: 0.75
  - source_model: {m3}
    positive_prompts: ["a dog ran"]
"""
SHARED_WITH_PROMPTS = (
    'shared_experts:\n  - source_model: {m3}\n    positive_prompts: ["the"]\n    residual_scale: 0.5\n'
)
SHARED = "shared_experts:\n  - source_model: {m1}\n    residual_scale: 0.5\n"
CASES = {
    "mixtral_cheap_embed": "gate_mode: cheap_embed\narchitecture: mixtral\n" + EXPERTS,
    "mixtral_cheap_embed_bf16": "gate_mode: cheap_embed\ndtype: bfloat16\nexperts_per_token: 1\n" + EXPERTS,
    "qwen_cheap_embed": "gate_mode: cheap_embed\narchitecture: qwen\n" + EXPERTS + SHARED_WITH_PROMPTS,
    "deepseek_cheap_embed_bf16": "gate_mode: cheap_embed\ndtype: bfloat16\n" + EXPERTS + SHARED,
    "qwen_random": "gate_mode: random\narchitecture: qwen\n" + EXPERTS + SHARED_WITH_PROMPTS,
    "deepseek_uniform_random": "gate_mode: uniform_random\narchitecture: deepseek\n" + EXPERTS + SHARED,
}
TRANSFORMERS_DEFAULTS = {
    "output_hidden_states": False,
    "return_dict": True,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "problem_type": None,
    "output_attentions": False,
    "pad_token_id": None,
}
"""Fields transformers writes into DeepSeek's config.json as mergekit-moe builds it, all at their defaults."""


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case built by mergekit-moe in one process of its venv: root/<case>/mergekit from root/<case>/moe.yml."""
    python = mergekit_python()
    root = tmp_path_factory.mktemp("mergekit-moe")
    base, *fine_tunes = write_models(root / "models", 3)
    names = {"m1": fine_tunes[0], "m2": fine_tunes[1], "m3": fine_tunes[2]}
    arguments = []
    for case, body in CASES.items():
        (root / case).mkdir()
        (root / case / "moe.yml").write_text(f"base_model: {base}\n" + body.format(**names))
        arguments += [str(root / case / "moe.yml"), str(root / case / "mergekit")]
    driver = subprocess.run(
        [python, DRIVER, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=1800,
    )
    assert driver.returncode == 0, f"{DRIVER.name} failed ({driver.returncode}):\n{driver.stderr[-4000:]}"
    return root


def _build_both(mergekit: Path, case: str, work: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    error = mergekit / case / "mergekit.error"
    assert not error.exists(), f"mergekit-moe failed:\n{error.read_text()[-4000:]}"
    config = load_moe_config(mergekit / case / "moe.yml")
    run_moe(config, resolve_inputs(config), work)
    return load_tensors(mergekit / case / "mergekit"), load_tensors(work)


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_moe_as_mergekit(mergekit: Path, case: str, tmp_path: Path) -> None:
    expected, actual = _build_both(mergekit, case, tmp_path / "mergebot")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        if "random" not in case or not _is_router(name):
            assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("case", ["mixtral_cheap_embed", "qwen_cheap_embed"])
def test_the_same_config_json_as_mergekit(mergekit: Path, case: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    _build_both(mergekit, case, tmp_path / "mergebot")
    expected = AutoConfig.from_pretrained(mergekit / case / "mergekit").to_dict()
    actual = AutoConfig.from_pretrained(tmp_path / "mergebot").to_dict()
    for config in (expected, actual):
        config.pop("_name_or_path")
    assert actual == expected


def test_deepseeks_config_json_has_mergekits_fields(mergekit: Path, tmp_path: Path) -> None:
    """The same fields and values, but the dtype, which mergebot writes once (mergekit-moe writes the output's as
    torch_dtype and leaves the base's as dtype), and the remote-code pointers, which mergebot leaves out."""
    case = "deepseek_cheap_embed_bf16"
    _build_both(mergekit, case, tmp_path / "mergebot")
    expected = json.loads((mergekit / case / "mergekit" / "config.json").read_text())
    actual = json.loads((tmp_path / "mergebot" / "config.json").read_text())
    assert expected.pop("torch_dtype") == "bfloat16" and actual.pop("torch_dtype") == "bfloat16"
    assert actual.pop("dtype") == "bfloat16"
    assert expected.pop("auto_map") and "auto_map" not in actual
    for name in ("dtype", "transformers_version", "_name_or_path"):
        expected.pop(name)
    for name, value in TRANSFORMERS_DEFAULTS.items():
        assert expected.pop(name) == value and actual.pop(name, value) == value, name
    assert actual.pop("rope_theta") == expected["rope_parameters"]["rope_theta"]  # the base's older spelling too
    assert actual == expected
