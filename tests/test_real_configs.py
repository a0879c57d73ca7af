"""Configs as people write them: what mergekit 0.1.5 ignores is ignored with one warning line (and the same merge
as mergekit's), what it applies (out_dtype, modules) is applied, and `check-config` refuses, all at once and with
lines, what a run would refuse."""

import pytest
import torch

from mergebot.config.daemon import check_daemon_config
from mergebot.config.merge import load_merge_config
from mergebot.dev.synthetic import make_model
from tests.helpers import load_tensors, run_cli, run_cli_process
from tests.mergekit_reference import listed, register

pytest_plugins = ["tests.mergekit_fixtures"]

IGNORED = "ignored, as mergekit does"
TWO = listed(("m1", "weight: 0.7"), ("m2", "weight: 0.3"))
CONFIGS = {
    # the output in out_dtype, computed in dtype (float32, as mergebot always computes)
    "out_dtype": "merge_method: linear\nout_dtype: bfloat16\n" + TWO,
    # top-level keys mergekit reads no such key at the top level
    "top_level_keys": "merge_method: ties\nbase_model: {base}\nint8_mask: true\npad_to_multiple_of: 64\n"
    + listed(("m1", "weight: 0.7, density: 0.5"), ("m2", "weight: 0.5, density: 0.8")),
    # every line of `parameters:` commented out: YAML null
    "null_parameters": "merge_method: task_arithmetic\nbase_model: {base}\nparameters:\n#  lambda: 0.5\n" + TWO,
    # parameters the method does not declare
    "multislerp_normalize": "merge_method: multislerp\nparameters:\n  normalize: true\n" + TWO,
    "sce_weight": "merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n" + TWO,
    "karcher_weight": "merge_method: karcher\n" + TWO,
    # a global parameter under a model: mergekit reads it from the top level only
    "model_level_t": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\n"
    + listed("base", ("m1", "t: 0.9")),
    # numbers and truth values written as strings, which mergekit reads as numbers and bools
    "quoted_values": "merge_method: ties\nbase_model: {base}\nparameters: {{normalize: 'true', lambda: '0.9'}}\n"
    + listed(("m1", "weight: '0.7', density: '0.5'"), ("m2", "weight: 0.5, density: ['0.3', 0.8]")),
    # mergekit's modules: a Llama has one, `default`; its parameters come before the top-level ones
    "modules": "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.9}}\nmodules:\n  default:\n    models:\n"
    "      - model: {base}\n      - model: {m1}\n    parameters: {{t: [0.2, 0.6]}}\n",
}
WARNINGS = {
    "out_dtype": [],
    "top_level_keys": ["int8_mask", "pad_to_multiple_of"],
    "null_parameters": ["parameters"],
    "multislerp_normalize": ["parameters.normalize"],
    "sce_weight": ["models[0].parameters.weight", "models[1].parameters.weight"],
    "karcher_weight": ["models[0].parameters.weight", "models[1].parameters.weight"],
    "model_level_t": ["models[1].parameters.t"],
    "quoted_values": [],
    "modules": [],
}
"""The keys each case warns about, one line each."""


@pytest.mark.parametrize("case", register(CONFIGS, "dtype: float32\n"))
def test_a_config_mergekit_accepts_merges_as_mergekit_does_with_a_line_per_ignored_key(case, mergekit, tmp_path):
    outputs = mergekit.run_both(case, tmp_path)
    # out_dtype: both round the same float32 result to bfloat16, but may add it in another order (one bf16 step)
    outputs.assert_close(relative=8e-3 if case == "out_dtype" else 1e-6)
    config = mergekit.root / case / "merge.yml"
    warnings = load_merge_config(config).warnings
    assert [line.split(": ")[1] for line in warnings] == WARNINGS[case]
    assert all(line.startswith(f"{config}:") and IGNORED in line for line in warnings)
    if case == "out_dtype":
        assert {tensor.dtype for tensor in outputs.mergebot.values()} == {torch.bfloat16}


DAEMON = '[daemon]\nstate_dir = "state"\n'


def target(name: str, merge: str) -> str:
    return f'\n[[targets]]\nname = "{name}"\nrepo = "me/{name}"\n{merge}'


MODELS = 'models = [{ model = "org/a" }, { model = "org/b" }]\n'
BROKEN = (
    DAEMON
    + target("misspelt", f'merge_method = "lineer"\n{MODELS}')
    + target("no-t", f'merge_method = "slerp"\nbase_model = "org/a"\n{MODELS}')
    + target(
        "wieght",
        'merge_method = "linear"\n'
        'models = [{ model = "org/a", parameters = { wieght = 0.5 } },\n'
        '  { model = "org/b", parameters = { weight = 1 } }]\n',
    )
)


def test_check_config_reports_every_problem_at_once_each_with_its_line(tmp_path):
    """A misspelt method, slerp without t and a misspelt weight all fail check-config (and so a reload, which
    checks the same way), each with its file, line and key, and the name it was probably meant to be."""
    config = tmp_path / "mergebot.toml"
    config.write_text(BROKEN)
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mergebot: warning: {config}:21: targets[2].models[0].parameters.wieght: {IGNORED}: linear has no "
        "parameter wieght (it has: normalize, weight); did you mean 'weight'?",
        f"mergebot: error: {config}:7: targets[0].merge_method: 'lineer' is not a merge method; did you mean "
        "'linear'? (known: arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, "
        "karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, ram, ramplus_tl, sce, slerp, "
        "task_arithmetic, ties)",
        f"mergebot: error: {config}:13: targets[1].parameters.t: required by slerp",
        f"mergebot: error: {config}:21: targets[2].models[0].parameters.weight: required by linear for org/a (here "
        "or in the top-level parameters)",
    ]
    _, problems = check_daemon_config(config, BROKEN)  # what a reload runs on the new text
    assert len(problems) == 3


TWO_MODELS = "models:\n  - model: org/a\n  - model: org/b\n"
PROBLEMS = {
    "range": (
        f"merge_method: ties\nbase_model: org/a\n{TWO_MODELS}    parameters: {{weight: 1, density: 1.5}}\n",
        "6: models[1].parameters.density: 1.5 must be > 0 and ≤ 1",
    ),
    "bool": (
        f"merge_method: ties\nbase_model: org/a\n{TWO_MODELS}parameters: {{weight: 1, normalize: 0.5}}\n",
        "6: parameters.normalize: 0.5 is not true or false",
    ),
    "whole number": (f"merge_method: karcher\n{TWO_MODELS}parameters: {{max_iter: 2.5}}\n", "5: parameters.max_iter"),
    "base": (f"merge_method: ties\n{TWO_MODELS}parameters: {{weight: 1}}\n", "1: base_model: required by merge_method"),
    "count": (f"merge_method: slerp\nbase_model: org/c\n{TWO_MODELS}parameters: {{t: 1}}\n", "3: models: slerp takes"),
    "applied": (
        "merge_method: passthrough\nmodels:\n  - model: org/a\n    parameters: {scale: 0.5}\n",
        "4: models[0].parameters.scale: mergekit's passthrough applies scale; mergebot does not have it",
    ),
    "tokenizer": (f"merge_method: karcher\n{TWO_MODELS}tokenizer: {{source: org/c}}\n", "5: tokenizer.source: 'org/c'"),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_check_config_refuses_what_a_run_refuses(problem, tmp_path):
    text, message = PROBLEMS[problem]
    config = tmp_path / "merge.yml"
    config.write_text(text)
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2, result.stderr
    assert f"mergebot: error: {config}:{message}" in result.stderr, result.stderr


def test_a_module_mergebot_cannot_map_is_refused_with_its_line(tmp_path, capsys):
    base = make_model(tmp_path / "base", layers=2, hidden=16, intermediate=32)
    other = make_model(tmp_path / "other", base=base, seed=1)
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodules:\n  text_decoder:\n    models:\n"
        f"      - model: {base}\n      - model: {other}\n"
    )
    assert run_cli("merge", config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{config}:5: modules.text_decoder: LlamaForCausalLM has no module 'text_decoder'" in err
    assert "(its modules: default)" in err
    assert not (tmp_path / "out").exists()


def test_every_module_must_merge_the_same_models(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: slerp\nbase_model: org/a\nparameters: {t: 0.5}\nmodules:\n"
        "  text_decoder:\n    models: [{model: org/a}, {model: org/b}]\n"
        "  vision_tower:\n    models: [{model: org/a}, {model: org/c}]\n"
    )
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2
    assert f"{config}:8: modules.vision_tower.models: every module must merge the same models" in result.stderr


def test_qwen2_vl_modules_each_take_their_own_parameters(tmp_path, capsys):
    """text_decoder, vision_tower and multi_modal_projector of a Qwen2-VL, each with its own t: each tensor is the
    one a whole-model merge with its module's t gives."""
    from tests.tiny_architectures import ARCHITECTURES, build, fine_tune

    base = build(ARCHITECTURES["qwen2_vl"], tmp_path / "base")
    other = fine_tune(base, tmp_path / "other", seed=1)
    t = {"text_decoder": 0.2, "vision_tower": 0.8, "multi_modal_projector": 0.5}
    modules = "".join(
        f"  {name}:\n    models: [{{model: {base}}}, {{model: {other}}}]\n    parameters: {{t: {value}}}\n"
        for name, value in t.items()
    )
    config = tmp_path / "modules.yml"
    config.write_text(f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.0}}\nmodules:\n{modules}")
    assert run_cli("merge", config, tmp_path / "out") == 0
    merged = load_tensors(tmp_path / "out")
    for value in set(t.values()):
        assert (
            run_cli(
                "merge", "--method", "slerp", "--base-model", base, other, "--set", f"t={value}", tmp_path / f"t{value}"
            )
            == 0
        )
    whole = {value: load_tensors(tmp_path / f"t{value}") for value in set(t.values())}
    prefixes = {"text_decoder": ("model.", "lm_head."), "vision_tower": ("visual.blocks.", "visual.patch_embed."),
                "multi_modal_projector": ("visual.merger.",)}  # fmt: skip
    for name, tensor in merged.items():
        module = next(module for module, found in prefixes.items() if name.startswith(found))
        assert torch.equal(tensor, whole[t[module]][name]), name
    # mergekit numbers the projector's tensors as layers; mergebot does not, so a gradient there is refused
    config.write_text(config.read_text().replace("parameters: {t: 0.5}", "parameters: {t: [0.2, 0.4]}"))
    assert run_cli("merge", config, tmp_path / "graded") == 2
    assert f"{config}:11: modules.multi_modal_projector: t is a list" in capsys.readouterr().err


def test_a_path_neither_here_nor_on_the_hub_says_both_without_retrying(devhub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", devhub.url)
    monkeypatch.chdir(tmp_path)
    make_model(tmp_path / "base")
    assert run_cli("merge", "--method", "linear", "base:1", "models/nope:1", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"no directory models/nope here, and no repo models/nope on {devhub.url}" in err
    assert "hub retry" not in err
    assert sum(devhub.stats()["requests"].values()) <= 2  # the revision's resolve, and the refs that tell why


def test_a_path_that_cannot_be_a_repo_id_is_refused_at_check_time(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: passthrough\nmodels:\n  - model: ./models/nope\n")
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2
    assert f"{config}:3: models[0].model: no directory ./models/nope here, and it cannot be a Hub repo id" in (
        result.stderr
    )


def test_the_quick_form_weighs_models_without_a_weight_equally(tmp_path):
    base = make_model(tmp_path / "base", layers=2, hidden=16, intermediate=32)
    other = make_model(tmp_path / "other", base=base, seed=1)
    assert run_cli("merge", "--method", "linear", base, other, tmp_path / "equal") == 0
    assert run_cli("merge", "--method", "linear", f"{base}:1", f"{other}:1", tmp_path / "ones") == 0
    equal, ones = load_tensors(tmp_path / "equal"), load_tensors(tmp_path / "ones")
    assert all(torch.equal(equal[name], ones[name]) for name in ones)


def test_the_quick_form_names_a_missing_out_dir(tmp_path, capsys):
    base = make_model(tmp_path / "base", layers=2, hidden=16, intermediate=32)
    other = make_model(tmp_path / "other", base=base, seed=1)
    assert run_cli("merge", "--method", "linear", base, other) == 2
    assert f"merge --method: {other} is a model, not an output directory: give OUT_DIR last" in (
        capsys.readouterr().err
    )
    assert run_cli("merge", "--method", "linear", f"{base}:1", f"{other}:1") == 2


def test_every_stage_of_a_multi_stage_file_is_checked_at_once(tmp_path):
    config = tmp_path / "multi.yml"
    config.write_text(
        "name: first\nmerge_method: slerp\nbase_model: org/a\nmodels: [{model: org/a}, {model: org/b}]\n---\n"
        "merge_method: ties\nbase_model: first\nmodels: [{model: first}, {model: org/c, parameters: {densty: 1}}]\n"
    )
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mergebot: warning: {config}:8: models[1].parameters.densty: {IGNORED}: ties has no parameter densty (it "
        "has: density, int8_mask, lambda, normalize, rescale, weight); did you mean 'density'?",
        f"mergebot: error: {config}:2: parameters.t: required by slerp",
        f"mergebot: error: {config}:8: models[1].parameters.weight: required by ties for org/c (here or in the "
        "top-level parameters)",
    ]


def test_check_config_passes_a_config_mergekit_accepts_with_one_warning_per_ignored_key(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: slerp\nbase_model: org/a\nint8_mask: true\nslices:\n  - sources:\n"
        "      - {model: org/a, layer_range: [0, 2]}\n      - {model: org/b, layer_range: [0, 2]}\n"
        "    residual_weight: 0.5\nparameters:\n  t:\n    - {filter: mlp, value: [0, 1], note: x}\n    - value: 0.5\n"
        "tokenizer: {source: union, tokens: {'<x>': {source: org/b, weight: 1}}}\n"
    )
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok, 1 merge(s)\n"
    assert [line.split(": ")[3] for line in result.stderr.splitlines()] == [
        "int8_mask",
        "parameters.t[0].note",
        "slices[0].residual_weight",
        "tokenizer.tokens.<x>.weight",
    ]
    assert all(
        line.startswith(f"mergebot: warning: {config}:") and IGNORED in line for line in result.stderr.splitlines()
    )
