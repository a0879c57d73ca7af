"""What each merge input is known by: a local directory by the content of every file a merge reads, a Hub repo by
its commit sha; the run record, the parent perplexity cache and `mergebot validate` all use the same identity."""

import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from mergebot.config.document import Located
from mergebot.config.merge import MergeConfig, parse_merge
from mergebot.dev.synthetic import make_model
from mergebot.pipeline.inputs import identities, resolve_inputs
from tests.helpers import run_cli

EVAL = Path(__file__).resolve().parents[1] / "config" / "eval.txt"


def linear(*models: Path | str) -> MergeConfig:
    entries = [{"model": str(model), "parameters": {"weight": 1.0}} for model in models]
    return parse_merge({"merge_method": "linear", "models": entries}, Located(Path("<test>"), ""))


def scale_shard(file: Path, factor: float) -> None:
    save_file({name: t * factor for name, t in load_file(file).items()}, file, metadata={"format": "pt"})


def test_local_models_differing_only_in_the_last_shard_have_different_identities(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", shard_size=60_000)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) >= 3
    copy = Path(shutil.copytree(model, tmp_path / "copy"))
    first = identities(resolve_inputs(linear(model, copy)))
    assert first[str(model)] == first[str(copy)]  # same content, same identity, wherever it lies

    scale_shard(copy / shards[-1].name, 2.0)
    second = identities(resolve_inputs(linear(model, copy)))
    assert second[str(model)] == first[str(model)]
    assert second[str(copy)] != second[str(model)]

    scale_shard(model / shards[-1].name, 3.0)  # a new version of the same directory
    assert identities(resolve_inputs(linear(model)))[str(model)] != first[str(model)]


def test_hub_input_is_known_by_its_commit_sha(devhub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", devhub.url)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    api = HfApi(endpoint=devhub.url, token="test-token")
    api.create_repo("org/model")
    sha = api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "model"), commit_message="up").oid
    assert identities(resolve_inputs(linear("org/model"))) == {"org/model": sha}


def test_validate_compares_with_parents_under_their_identities(tmp_path: Path, capsys) -> None:
    base = make_model(tmp_path / "base", shard_size=60_000)
    ft = make_model(tmp_path / "ft", base=base, seed=1, shard_size=60_000)
    out = tmp_path / "out"
    assert run_cli("merge", "--method", "linear", f"{base}:0.5", f"{ft}:0.5", out) == 0
    capsys.readouterr()
    assert run_cli("validate", out, "--eval-text", EVAL) == 0
    table = capsys.readouterr().out
    for model, identity in identities(resolve_inputs(linear(base, ft))).items():
        assert f"{model} " in table and f"  {identity}" in table
