"""`mergebot devhub make-model` and `push`, as the README's "Your own local Hub" runs them, against a real local Hub."""

import json

import pytest
import requests
from huggingface_hub import HfApi

from mergebot.cli import main
from mergebot.dev.devhub import DevHub
from mergebot.errors import ExitCode


def test_make_a_model_and_its_fine_tune_push_both_and_browse_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "local")
    tiny, tuned = tmp_path / "tiny", tmp_path / "tiny-ft"
    assert main(["devhub", "make-model", str(tiny), "--layers", "2", "--hidden", "32", "--vocab", "300"]) == 0
    assert main(["devhub", "make-model", str(tuned), "--fine-tune-of", str(tiny), "--seed", "1"]) == 0
    assert json.loads((tiny / "config.json").read_text())["num_hidden_layers"] == 2
    assert (tiny / "model.safetensors").read_bytes() != (tuned / "model.safetensors").read_bytes()

    with DevHub(tmp_path / "hub").start() as hub:
        for folder, repo in ((tiny, "me/tiny"), (tuned, "me/tiny-ft")):
            assert main(["devhub", "push", str(folder), repo, "--endpoint", hub.url]) == 0
            info = HfApi(endpoint=hub.url, token="local").model_info(repo, files_metadata=True)
            assert {s.rfilename: s.size for s in info.siblings if s.rfilename != ".gitattributes"} == {
                p.name: p.stat().st_size for p in folder.iterdir()
            }
            assert f"commit {info.sha}" in capsys.readouterr().out
            page = requests.get(f"{hub.url}/{repo}/tree/main", timeout=10)
            assert page.status_code == 200 and f'href="/{repo}/resolve/{info.sha}/model.safetensors"' in page.text

        assert main(["devhub", "push", str(tmp_path / "absent"), "me/x", "--endpoint", hub.url]) == ExitCode.PERMANENT
        assert "absent: not a directory" in capsys.readouterr().err
    assert main(["devhub", "make-model", str(tiny)]) == ExitCode.PERMANENT, "an existing model is not overwritten"


def test_devhub_without_a_subcommand_needs_a_root(capsys):
    assert main(["devhub"]) == ExitCode.PERMANENT
    assert capsys.readouterr().err.strip() == (
        "mergebot: error: devhub: give --root DIR (the directory that holds the repos) to serve a local Hub"
    )
    with pytest.raises(SystemExit):
        main(["devhub", "push"])
