"""The gate on the real model (SmolLM2-135M-Instruct and real fine-tunes): a healthy merge passes; a merge of a
broken upload, or of an upload with a NaN, is refused with the culprit named; an upstream whose tokenizer numbers
its vocabulary differently is aligned by token, never merged row by row."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebot.errors import ExitCode
from tests.helpers import load_tensors, run_cli_process

pytest_plugins = ["tests.realmodel_fixtures"]


def merge_and_validate(tmp_path: Path, *models: Path, name: str = "merged"):
    out = tmp_path / name
    sources = [f"{model}:{1 / len(models)}" for model in models]
    merged = run_cli_process("merge", "--method", "linear", *sources, out)
    assert merged.returncode == 0, merged.stderr
    return out, run_cli_process("validate", out)


def copy_with(src: Path, dst: Path, change) -> Path:
    """A copy of a single-file checkpoint with its tensors changed by `change(tensors)`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def check_line(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.strip().startswith(f"{name} "))


def test_healthy_merge_passes(real_fine_tunes, tmp_path):
    _, result = merge_and_validate(tmp_path, real_fine_tunes["code"], real_fine_tunes["licenses"])
    assert result.returncode == ExitCode.OK, result.stdout
    for name in ("kl divergence", "parents", "chat template", "end of turn", "config numerics", "stops"):
        assert " ok " in check_line(result.stdout, name), result.stdout


@pytest.mark.parametrize(
    ("kind", "check", "says"),
    [
        ("foreign template", "chat template", "not single tokens of its vocabulary"),
        ("wrong eos id", "end of turn", "eos_token_id differs"),
        ("re-initialised chat token rows", "stops", "ends its turn on 0/"),
        ("~10% perplexity damage", "parents", "damaged weights?"),
    ],
)
def test_a_merge_with_a_broken_upload_is_refused(real_base, real_broken_uploads, tmp_path, kind, check, says):
    """Each merged 50/50 with the instruct model, as users merge community fine-tunes: perplexity and KL pass all
    four; the check for that kind of defect refuses it and names what it saw."""
    upload = real_broken_uploads[kind]
    _, result = merge_and_validate(tmp_path, real_base, upload)
    assert result.returncode == ExitCode.VALIDATION_FAILED, result.stdout
    line = check_line(result.stdout, check)
    assert "FAIL" in line and says in line, result.stdout
    assert " ok " in check_line(result.stdout, "perplexity")


def test_merge_of_a_broken_upload_is_refused_naming_it(real_base, real_broken, tmp_path):
    _, result = merge_and_validate(tmp_path, real_base, real_broken)
    assert result.returncode == ExitCode.VALIDATION_FAILED
    parents_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("parents"))
    assert "FAIL" in parents_line and str(real_broken) in parents_line and "broken upload" in parents_line
    assert "SUSPECT" in result.stdout
    # Judged against the healthy parent only: the broken one does not raise the bar.
    perplexity_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("perplexity"))
    assert "FAIL" in perplexity_line


def test_an_upstream_nan_is_refused_naming_the_input(real_base, real_fine_tunes, tmp_path):
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.7.self_attn.q_proj.weight"][3, 5] = float("nan")

    poisoned = copy_with(real_fine_tunes["code"], tmp_path / "poisoned", poison)
    _, result = merge_and_validate(tmp_path, real_base, poisoned)
    assert result.returncode == ExitCode.VALIDATION_FAILED
    assert "NaN/inf in model.layers.7.self_attn.q_proj.weight" in result.stdout
    parents_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("parents"))
    assert str(poisoned) in parents_line and "not finite" in parents_line


def renumbered(src: Path, dst: Path) -> Path:
    """The same model with its ordinary tokens numbered in reverse (special tokens kept): a different vocabulary
    order, the same model. Embedding rows move with their tokens."""
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    special = {token["id"] for token in tokenizer["added_tokens"]}
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    ordinary = sorted(i for i in vocab.values() if i not in special)
    new_id = dict(zip(ordinary, reversed(ordinary), strict=True))
    order = list(range(len(vocab)))  # new row -> old row
    for old, new in new_id.items():
        order[new] = old

    def move_rows(tensors: dict[str, torch.Tensor]) -> None:
        embed = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = embed[torch.tensor(order)].contiguous()

    copy_with(src, dst, move_rows)
    tokenizer["model"]["vocab"] = {token: new_id.get(i, i) for token, i in vocab.items()}
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer))
    return dst


def test_a_renumbered_vocabulary_is_aligned_by_token(real_base, real_fine_tunes, tmp_path):
    code = real_fine_tunes["code"]
    other = renumbered(code, tmp_path / "renumbered")
    reference, _ = merge_and_validate(tmp_path, real_base, code, name="reference")
    aligned, result = merge_and_validate(tmp_path, real_base, other, name="aligned")
    assert result.returncode == ExitCode.OK, result.stdout
    expected, got = load_tensors(reference), load_tensors(aligned)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
