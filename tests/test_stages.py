"""Multi-stage merges (mergekit-multimerge's YAML, several documents, each with a `name`) with `mergebot merge`:
stages run in order, a later stage reads an earlier one's output by name, OUT_DIR gets the last, and a rerun
recomputes only the stages (and shards) whose inputs or settings changed."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mergebot.config.stages import stages_dir
from mergebot.dev.synthetic import make_model
from tests.helpers import load_tensors, run_cli, tree_digest
from tests.mergekit_reference import Outputs, mergekit_python


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    base = make_model(tmp_path / "base", layers=2, hidden=32, intermediate=48, dtype=torch.float32)
    return {
        "base": base,
        **{f"ft{n}": make_model(tmp_path / f"ft{n}", base=base, seed=n, dtype=torch.float32) for n in (1, 2)},
    }


def two_stages(models: dict[str, Path], t: float = 0.3, weight: float = 0.6) -> str:
    first = (
        f"name: first\nmerge_method: slerp\nbase_model: {models['base']}\nmodels:\n  - model: {models['base']}\n"
        f"  - model: {models['ft1']}\nparameters:\n  t: {t}\nout_shard_size: 30KB\n"
    )
    final = (
        f"merge_method: linear\nmodels:\n  - model: first\n    parameters:\n      weight: {weight}\n"
        f"  - model: {models['ft2']}\n    parameters:\n      weight: 0.4\nout_shard_size: 30KB\n"
    )
    return f"# built in two stages\n{first}---\n{final}"


def outcomes(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"shard"' in line]


def test_the_second_stage_reads_the_first_and_out_dir_gets_the_last(models, tmp_path):
    config, out = tmp_path / "multi.yml", tmp_path / "out"
    config.write_text(two_stages(models))
    assert run_cli("merge", config, out) == 0
    first = stages_dir(out) / "first"
    assert stages_dir(out) == tmp_path / ".out.stages" and (first / "model.safetensors.index.json").exists()
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    stage_one, stage_two = two_stages(models).split("---\n")
    (by_hand / "one.yml").write_text(stage_one.replace("name: first\n", ""))
    (by_hand / "two.yml").write_text(stage_two.replace("model: first", f"model: {by_hand / 'first'}"))
    assert run_cli("merge", by_hand / "one.yml", by_hand / "first") == 0
    assert run_cli("merge", by_hand / "two.yml", by_hand / "out") == 0
    expected, actual = tree_digest(by_hand / "out"), tree_digest(out)
    assert expected.pop("mergebot_config.yml") and f"model: {first}" in (out / "mergebot_config.yml").read_text()
    actual.pop("mergebot_config.yml")
    assert actual == expected
    assert load_tensors(out).keys() == load_tensors(models["base"]).keys()


def test_a_rerun_recomputes_only_the_stage_that_changed(models, tmp_path, capsys):
    config, out = tmp_path / "multi.yml", tmp_path / "out"
    config.write_text(two_stages(models))
    assert run_cli("merge", config, out) == 0
    first_run = outcomes(capsys)
    assert {line["stage"] for line in first_run} == {"first", "final"}
    assert {line["outcome"] for line in first_run} == {"computed"}
    config.write_text(two_stages(models, weight=0.2))
    assert run_cli("merge", config, out) == 0
    second_run = outcomes(capsys)
    by_stage = {
        stage: {line["outcome"] for line in second_run if line["stage"] == stage} for stage in ("first", "final")
    }
    assert by_stage == {"first": {"reused"}, "final": {"computed"}}
    config.write_text(two_stages(models, t=0.7, weight=0.2))
    assert run_cli("merge", config, out) == 0
    assert {line["outcome"] for line in outcomes(capsys)} == {"computed"}  # a new first stage changes the second
    assert run_cli("merge", config, out) == 0
    assert {line["outcome"] for line in outcomes(capsys)} == {"reused"}


MISTAKES = {
    "later": ("second", "'second' is a later stage: stages run in the order written"),
    "unknown": ("frist", "'frist' is not an earlier stage (earlier: first), a local directory or an org/name"),
    "itself": ("second", "'second' is this stage: a stage cannot read its own output"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_stage_naming_no_earlier_stage_is_refused_with_its_line(models, tmp_path, capsys, mistake):
    second_reads, message = MISTAKES[mistake]
    base = models["base"]

    def stage(name: str, reads: str) -> str:
        return f"name: {name}\nmerge_method: karcher\nmodels:\n  - model: {base}\n  - model: {reads}\n"

    config = tmp_path / "multi.yml"
    first = stage("first", models["ft1"] if mistake != "later" else second_reads)
    second = stage("second", models["ft2"] if mistake == "later" else second_reads)
    config.write_text(
        f"{first}---\n{second}---\nmerge_method: karcher\nmodels:\n  - model: second\n  - model: {base}\n"
    )
    lines = config.read_text().splitlines()
    culprit = next(n for n, text in enumerate(lines, 1) if text.endswith(f"- model: {second_reads}"))
    assert run_cli("merge", config, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert f"{config}:{culprit}: models[1].model: {message}" in error, error
    assert not (tmp_path / "out").exists() and not stages_dir(tmp_path / "out").exists()


@pytest.mark.parametrize(
    "documents, message",
    [
        (["merge_method: linear\n", "name: b\nmerge_method: linear\n"], "1: name: required: only the last stage"),
        (["name: a\nmerge_method: linear\n", "name: a\nmerge_method: linear\n"], "4: name: 'a' names two stages"),
        (["name: ../up\nmerge_method: linear\n"], "1: name: '../up': a stage name is letters"),
    ],
)
def test_stage_names_are_checked(tmp_path, capsys, documents, message):
    config = tmp_path / "multi.yml"
    config.write_text("---\n".join(documents))
    assert run_cli("merge", config, tmp_path / "out") == 2
    assert f"{config}:{message}" in capsys.readouterr().err


def test_the_same_multi_stage_merge_as_mergekit_multimerge(models, tmp_path):
    python = mergekit_python()
    config = tmp_path / "multi.yml"
    config.write_text(two_stages(models).replace("out_shard_size: 30KB\n", "dtype: float32\n"))
    command = [
        python.parent / "mergekit-multi", config, "--intermediate-dir", tmp_path / "mk-stages",
        "--out-path", tmp_path / "mergekit",
    ]  # fmt: skip
    mergekit = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert mergekit.returncode == 0, mergekit.stderr[-4000:]
    assert run_cli("merge", config, tmp_path / "mergebot") == 0
    Outputs(mergekit=load_tensors(tmp_path / "mergekit"), mergebot=load_tensors(tmp_path / "mergebot")).assert_close()
