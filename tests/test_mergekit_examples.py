"""mergekit's own example configs (tests/data/mergekit_examples, see SOURCE.md there) run unchanged with
`mergebot merge`: only their model names are pointed at tiny local models of the architecture each name stands for
(Llama or Mistral; as deep as the example's layer ranges need, 3 layers otherwise), and the result loads in
transformers and matches what `mergekit-yaml` makes of the same file. Options mergebot cannot honour are refused
with key and line."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
import yaml

from tests.helpers import load_tensors, run_cli
from tests.mergekit_reference import Outputs, merge_all_with_mergekit
from tests.tiny_architectures import TEXT, Architecture, assert_loads, build, fine_tune

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"
FAMILIES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}
MODELS = {
    "psmathur/orca_mini_v3_13b": "llama",
    "garage-bAInd/Platypus2-13B": "llama",
    "WizardLM/WizardLM-13B-V1.2": "llama",
    "WizardLM/WizardMath-13B-V1.0": "llama",
    "TheBloke/Llama-2-13B-fp16": "llama",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "BioMistral/BioMistral-7B": "mistral",
    "model_a": "llama",
    "model_b": "llama",
}
"""Every model an example names, and the family of its tiny stand-in (an example naming another fails here)."""
MODEL_LINE = re.compile(r"^(\s*(?:-\s+)?(?:model|base_model):\s*)(\S+)", re.MULTILINE)
DEFAULT_DEPTH = TEXT["num_hidden_layers"]

Pointer = Callable[[str], str]


def depth_for(text: str) -> int:
    """The layers a stand-in needs: up to the end of the example's last layer_range (40 for Llama 2 13B's)."""
    return max([int(end) for end in re.findall(r"layer_range: \[\d+, (\d+)\]", text)] or [DEFAULT_DEPTH])


def tiny(family: str, depth: int) -> Architecture:
    return Architecture(
        family, lambda: FAMILIES[family](**{**TEXT, "num_hidden_layers": depth}), "model.layers.", depth
    )


@pytest.fixture(scope="module")
def pointed_at(tmp_path_factory) -> Pointer:
    """An example's text → the same text with each `model:` and `base_model:` value replaced by the path of its
    stand-in: a distinct seeded fine-tune of its family's tiny base, built once per depth."""
    root = tmp_path_factory.mktemp("mergekit-examples")
    built: dict[int, dict[str, Path]] = {}

    def stand_ins(depth: int) -> dict[str, Path]:
        if depth not in built:
            bases = {family: build(tiny(family, depth), root / f"{family}-{depth}") for family in FAMILIES}
            built[depth] = {
                name: fine_tune(bases[family], root / f"model{number}-{depth}", seed=number)
                for number, (name, family) in enumerate(sorted(MODELS.items()), 1)
            }
        return built[depth]

    def point(text: str) -> str:
        paths = stand_ins(depth_for(text))
        return MODEL_LINE.sub(lambda match: f"{match[1]}{paths[match[2]]}", text)

    return point


def example_names() -> list[str]:
    return sorted(path.name for path in EXAMPLES.glob("*.yml"))


def test_the_examples_are_there():
    assert len(example_names()) >= 6


def expected_layers(text: str) -> int:
    """Slices stack up their layer ranges; a models: config keeps its models' depth."""
    document = yaml.safe_load(text)
    if "slices" in document:
        return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in document["slices"])
    return depth_for(text)


@pytest.mark.parametrize("example", example_names())
def test_example_runs_unchanged_and_loads(pointed_at, tmp_path, example):
    text = (EXAMPLES / example).read_text()
    config = tmp_path / example
    config.write_text(pointed_at(text))
    assert run_cli("merge", config, tmp_path / "out") == 0
    assert_loads(tmp_path / "out", expected_layers(text))


@pytest.fixture(scope="module")
def mergekit_float32(pointed_at, tmp_path_factory) -> Path:
    """Every example, its dtype set to float32, merged by mergekit (in one process): ROOT/<example>/mergekit.

    In the examples' own 16-bit dtypes mergekit computes, and takes TIES' and Arcee Fusion's keep-or-drop decisions,
    on rounded values, so single entries may rightly differ from mergebot's float32 result; in float32 both agree."""
    root = tmp_path_factory.mktemp("mergekit-float32")
    configs = {
        example: re.sub(r"(?m)^dtype: .*$", "dtype: float32", pointed_at((EXAMPLES / example).read_text()))
        for example in example_names()
    }
    merge_all_with_mergekit(root, configs)
    return root


@pytest.mark.parametrize("example", example_names())
def test_example_matches_mergekit_in_float32(mergekit_float32, tmp_path, example):
    case = mergekit_float32 / example
    assert not (case / "mergekit.error").exists(), (case / "mergekit.error").read_text()[-4000:]
    assert run_cli("merge", case / "merge.yml", tmp_path / "mergebot") == 0
    Outputs(mergekit=load_tensors(case / "mergekit"), mergebot=load_tensors(tmp_path / "mergebot")).assert_close()
