"""mergekit's own example configs (tests/data/mergekit_examples, see SOURCE.md there) run unchanged with
`mergebot merge`: only their model names are pointed at tiny local models of the architecture each name stands for
(Llama 2 13B with its 40 layers, so every layer_range holds; Mistral 7B), and the result loads in transformers and
matches what `mergekit-yaml` makes of the same file. Options mergebot cannot honour are refused with key and line."""

import re
from pathlib import Path

import pytest
import transformers
import yaml

from tests.helpers import run_cli
from tests.mergekit_reference import run_both
from tests.tiny_architectures import ARCHITECTURES, TEXT, Architecture, assert_loads, build, fine_tune

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"
LLAMA_13B = Architecture(
    "llama-13b", lambda: transformers.LlamaConfig(**{**TEXT, "num_hidden_layers": 40}), "model.layers.", layers=40
)
FAMILIES = {"llama-13b": LLAMA_13B, "mistral": ARCHITECTURES["mistral"], "llama": ARCHITECTURES["llama"]}
MODELS = {
    "psmathur/orca_mini_v3_13b": "llama-13b",
    "garage-bAInd/Platypus2-13B": "llama-13b",
    "WizardLM/WizardLM-13B-V1.2": "llama-13b",
    "WizardLM/WizardMath-13B-V1.0": "llama-13b",
    "TheBloke/Llama-2-13B-fp16": "llama-13b",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "BioMistral/BioMistral-7B": "mistral",
    "model_a": "llama",
    "model_b": "llama",
}
"""Every model an example names, and the family of its tiny stand-in (an example naming another fails here)."""
MODEL_LINE = re.compile(r"^(\s*(?:-\s+)?(?:model|base_model):\s*)(\S+)", re.MULTILINE)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Each model name → a distinct seeded fine-tune of its family's tiny base."""
    root = tmp_path_factory.mktemp("mergekit-examples")
    bases = {family: build(architecture, root / family) for family, architecture in FAMILIES.items()}
    return {
        name: fine_tune(bases[family], root / f"model{number}", seed=number)
        for number, (name, family) in enumerate(sorted(MODELS.items()), 1)
    }


def pointed_at(text: str, stand_ins: dict[str, Path]) -> str:
    """The example's text with each `model:` and `base_model:` value replaced by its stand-in's path."""
    return MODEL_LINE.sub(lambda match: f"{match[1]}{stand_ins[match[2]]}", text)


def example_names() -> list[str]:
    return sorted(path.name for path in EXAMPLES.glob("*.yml"))


def test_the_examples_are_there():
    assert len(example_names()) >= 6


def expected_layers(config: Path) -> int:
    """Slices stack up their layer ranges; a models: config keeps its models' depth."""
    document = yaml.safe_load(config.read_text())
    if "slices" in document:
        return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in document["slices"])
    return FAMILIES[MODELS[document["models"][0]["model"]]].layers


@pytest.mark.parametrize("example", example_names())
def test_example_runs_unchanged_and_loads(stand_ins, tmp_path, example):
    config = tmp_path / example
    config.write_text(pointed_at((EXAMPLES / example).read_text(), stand_ins))
    assert run_cli("merge", config, tmp_path / "out") == 0
    assert_loads(tmp_path / "out", expected_layers(EXAMPLES / example))


@pytest.mark.parametrize("example", example_names())
def test_example_matches_mergekit_in_float32(stand_ins, tmp_path, example):
    """The same numbers as mergekit, with the example's dtype set to float32: in the examples' own 16-bit dtypes
    mergekit computes, and takes TIES and Arcee Fusion's keep-or-drop decisions, on rounded values, so single
    entries may rightly differ from mergebot's float32 result there."""
    text = re.sub(r"(?m)^dtype: .*$", "dtype: float32", pointed_at((EXAMPLES / example).read_text(), stand_ins))
    run_both(text, tmp_path).assert_close()


@pytest.mark.parametrize(
    "addition",
    ["modules:\n  text_decoder:\n    models: []\n", "out_dtype: bfloat16\n", "name: first-merge\n"],
)
def test_a_mergekit_option_mergebot_lacks_is_refused_with_key_and_line(stand_ins, tmp_path, capsys, addition):
    """mergekit options that mergebot does not have (per-module configs, a separate output dtype, the stage names of
    a multi-stage merge) stop the merge with the file, line and key; none is ignored."""
    config = tmp_path / "linear.yml"
    text = pointed_at((EXAMPLES / "linear.yml").read_text(), stand_ins)
    config.write_text(text + addition)
    key = addition.split(":")[0]
    assert run_cli("merge", config, tmp_path / "out") == 2
    assert f"{config}:{text.count(chr(10)) + 1}: {key}: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_lora_model_is_refused_with_key_and_line(stand_ins, tmp_path, capsys):
    """mergekit's `model+lora` names a LoRA to apply first, which mergebot cannot do: refused, not looked up."""
    config = tmp_path / "linear.yml"
    text = pointed_at((EXAMPLES / "linear.yml").read_text(), stand_ins)
    config.write_text(text.replace(str(stand_ins["psmathur/orca_mini_v3_13b"]), "org/base+org/lora-adapter"))
    assert run_cli("merge", config, tmp_path / "out") == 2
    assert f"{config}:2: models[0].model: 'org/base+org/lora-adapter' is mergekit's model+LoRA form" in (
        capsys.readouterr().err
    )
