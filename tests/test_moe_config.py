"""mergekit-moe configs: read as mergekit-moe 0.1.5 reads them, every problem at once with its file, line and key."""

from dataclasses import replace
from pathlib import Path

import pytest

from mergebot.config.document import read_document
from mergebot.config.moe import Expert, is_moe_document, load_moe_config, parse_moe
from mergebot.errors import ConfigErrors
from tests.helpers import run_cli

GOOD = """\
base_model: org/base
gate_mode: cheap_embed
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: org/code
    positive_prompts: ["write a function"]
    negative_prompts: ["tell a story"]
  - source_model: org/story@v2
    positive_prompts: ["tell a story"]
    residual_scale: 0.5
    noise_scale: 0.01
"""


def _write(tmp_path: Path, text: str, name: str = "moe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_moe_config(_write(tmp_path, text))
    return [str(problem) for problem in caught.value.problems]


def test_a_mergekit_moe_config_is_read_with_its_fields(tmp_path: Path) -> None:
    config = load_moe_config(_write(tmp_path, GOOD))
    assert config.base_model == "org/base"
    assert config.gate_mode == "cheap_embed" and config.dtype == "bfloat16" and config.experts_per_token == 2
    assert config.experts == (
        Expert("org/code", ("write a function",), ("tell a story",)),
        Expert("org/story", ("tell a story",), (), noise_scale=0.01, residual_scale=0.5),
    )
    assert [spec.model for spec in config.models] == ["org/base", "org/code", "org/story"]
    assert config.spec("org/story").revision == "v2"
    assert config.tokenizer_source == "org/base" and config.warnings == ()
    again = parse_moe(config.as_dict(), read_document(_write(tmp_path, GOOD, "again.yml"))[1])
    assert again == replace(config, source=again.source)


def test_defaults_are_mergekit_moes(tmp_path: Path) -> None:
    """gate_mode hidden, two experts per token, the architecture chosen from the models, the base's dtype."""
    text = "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n"
    text += "  - source_model: y\n    positive_prompts: [b]\n"
    config = load_moe_config(_write(tmp_path, text))
    assert (config.gate_mode, config.experts_per_token, config.architecture, config.dtype) == ("hidden", 2, None, None)


def test_every_problem_at_once_with_its_line(tmp_path: Path) -> None:
    text = """\
base_model: org/base
gate_mode: cheap
architecture: llama
dtype: bf16
experts_per_token: 3
experts:
  - source_model: org/a+org/lora
    positive_prompts: "not a list"
  - source_model: org/b
    positive_prompts: [x]
    noise_scale: loud
merge_method: linear
"""
    problems = _problems(tmp_path, text)
    path = tmp_path / "moe.yml"
    assert f"{path}:2: gate_mode: 'cheap' is not a gate mode; did you mean 'cheap_embed'?" in problems[1]
    expected = [
        f"{path}:12: merge_method: a mergekit-yaml key",
        f"{path}:2: gate_mode:",
        f"{path}:7: experts[0].source_model: mergekit-moe 0.1.5 cannot read a model+LoRA input",
        f"{path}:8: experts[0].positive_prompts: must be a list of prompt strings",
        f"{path}:11: experts[1].noise_scale: 'loud' is not a finite number",
        f"{path}:5: experts_per_token: 3 experts per token, but only 1 experts",
        f"{path}:3: architecture: 'llama' names no output architecture",
        f"{path}:4: dtype: 'bf16' is not one of bfloat16, float16, float32",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), (problem, start)


@pytest.mark.parametrize(
    ("experts", "gate_mode", "message"),
    [
        ("  - source_model: a\n    positive_prompts: [x]\n  - source_model: b\n", "cheap_embed", "required for"),
        ("  - source_model: a\n    positive_prompts: [x]\n  - source_model: b\n", "uniform_random", "required for"),
        ("  - source_model: a\n    positive_prompts: [x]\n  - source_model: b\n    positive_prompts: [x]\n", "hidden",
         "every expert has the same prompts"),
        ("  - source_model: a\n    positive_prompts: [x]\n  - source_model: a\n    positive_prompts: [y]\n", "hidden",
         "every expert is the same model"),
        ("  - source_model: a\n    positive_prompts: [x]\n", "cheap_embed", "only one expert"),
    ],
)  # fmt: skip
def test_mergekit_moes_refusals(tmp_path: Path, experts: str, gate_mode: str, message: str) -> None:
    text = f"base_model: base\ngate_mode: {gate_mode}\nexperts_per_token: 1\nexperts:\n{experts}"
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and message in problems[0], problems
    assert f"{tmp_path / 'moe.yml'}:" in problems[0]


def test_a_random_router_needs_no_prompts(tmp_path: Path) -> None:
    """As mergekit-moe: `random` skips the prompt checks (not `uniform_random`), even for one model twice."""
    text = "base_model: base\ngate_mode: random\nexperts:\n  - source_model: a\n  - source_model: a\n"
    config = load_moe_config(_write(tmp_path, text))
    assert [e.model for e in config.experts] == ["a", "a"] and config.gated == config.experts


def test_shared_experts_take_prompts_all_or_none(tmp_path: Path) -> None:
    text = "base_model: base\ngate_mode: random\nexperts:\n  - source_model: a\n  - source_model: b\n"
    both = text + "shared_experts:\n  - source_model: c\n    positive_prompts: [x]\n  - source_model: d\n"
    problems = _problems(tmp_path, both)
    assert len(problems) == 1 and "shared_experts: give prompts for every shared expert or for none" in problems[0]
    config = load_moe_config(_write(tmp_path, text + "shared_experts:\n  - source_model: c\n    residual_scale: 2\n"))
    assert config.shared_experts == (Expert("c", residual_scale=2.0),)
    assert [e.model for e in config.gated] == ["a", "b", "c"]  # a random router draws a row for it too


def test_keys_mergekit_moe_ignores_are_ignored_with_a_warning(tmp_path: Path) -> None:
    """mergekit-moe has no tokenizer or chat-template keys (it saves the base's tokenizer): ignored, as it does."""
    text = GOOD + "tokenizer_source: union\nchat_template: chatml\n"
    text = text.replace("    residual_scale: 0.5\n", "    residual_scale: 0.5\n    weight: 2\n")
    config = load_moe_config(_write(tmp_path, text))
    path = tmp_path / "moe.yml"
    assert config.warnings == (
        f"{path}:15: chat_template: ignored, as mergekit does: mergekit-moe has no such key",
        f"{path}:14: tokenizer_source: ignored, as mergekit does: mergekit-moe has no such key",
        f"{path}:12: experts[1].weight: ignored, as mergekit does: mergekit-moe has no such key",
    )


def test_a_moe_file_is_told_from_a_merge_by_its_experts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert is_moe_document({"experts": []}) and not is_moe_document({"merge_method": "linear", "models": []})
    path = _write(tmp_path, GOOD)
    assert run_cli("check-config", "--config", path) == 0
    assert f"{path}: ok, 1 merge(s)" in capsys.readouterr().out
    broken = _write(tmp_path, GOOD.replace("gate_mode: cheap_embed", "gate_mode: nope"), "broken.yml")
    assert run_cli("check-config", "--config", broken) != 0
    assert f"{broken}:2: gate_mode: 'nope' is not a gate mode" in capsys.readouterr().err
