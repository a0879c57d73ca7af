"""Bad input: one clear line naming the file, model or key; exit code 2; nothing left half-done."""

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebot.dev.synthetic import make_model
from tests.helpers import run_cli, run_cli_process


@pytest.fixture()
def base(tmp_path) -> Path:
    return make_model(tmp_path / "base")


def merge_error(capsys, *args) -> str:
    """Run a merge that must fail: exit code 2, exactly one error line, no output directory."""
    out = Path(args[-1])
    code = run_cli("merge", *args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mergebot: error:")]
    assert code == 2
    assert len(err) == 1
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial/*.safetensors"))
    return err[0]


def test_model_missing_a_tensor(base, tmp_path, capsys):
    broken = make_model(tmp_path / "broken", base=base, seed=1)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{broken}:1", tmp_path / "out")
    assert "model.layers.2.mlp.up_proj.weight" in line and str(broken) in line


def test_model_with_an_extra_tensor(base, tmp_path, capsys):
    extra = make_model(tmp_path / "extra", base=base, seed=1)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{extra}:1", tmp_path / "out")
    assert "model.layers.0.mlp.extra.weight" in line and str(extra) in line


def test_shape_mismatch_outside_vocabulary(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", intermediate=96)
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{other}:1", tmp_path / "out")
    assert "shape" in line and "mlp" in line and str(other) in line


def test_truncated_safetensors(base, tmp_path, capsys):
    broken = make_model(tmp_path / "broken", base=base, seed=1)
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{broken}:1", tmp_path / "out")
    assert str(file) in line and "truncated" in line


def test_header_length_larger_than_file(base, tmp_path, capsys):
    broken = make_model(tmp_path / "broken", base=base, seed=1)
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{broken}:1", tmp_path / "out")
    assert str(file) in line and "header length" in line


def test_pickle_only_model_is_refused_unloaded(base, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not even a valid pickle: it must never be opened")
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{pickled}:1", tmp_path / "out")
    assert "pytorch_model.bin" in line and "safetensors only" in line


def test_unknown_method(base, tmp_path, capsys):
    line = merge_error(capsys, "--method", "average", f"{base}:1", tmp_path / "out")
    assert "merge_method" in line and "average" in line


def test_unknown_parameter(base, tmp_path, capsys):
    line = merge_error(capsys, "--method", "linear", f"{base}:1", "--set", "densty=0.5", tmp_path / "out")
    assert "densty" in line


def test_missing_required_parameter(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", base=base, seed=1)
    line = merge_error(capsys, "--method", "slerp", "--base-model", base, other, tmp_path / "out")
    assert "parameters.t" in line


def test_all_zero_weights(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", base=base, seed=1)
    line = merge_error(capsys, "--method", "linear", f"{base}:0", f"{other}:0.0", tmp_path / "out")
    assert "weight" in line and "zero" in line


def test_invalid_toml_names_the_line(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('merge_method = "linear"\nmodels = [\n  { model = "a" \n')
    line = merge_error(capsys, config, tmp_path / "out")
    assert str(config) in line and "line" in line


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1,\n")
    line = merge_error(capsys, config, tmp_path / "out")
    assert f"{config}:" in line and "invalid YAML" in line


def test_bad_value_names_key_and_line(base, tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text(f'merge_method = "passthrough"\ndtype = "int4"\nmodels = [{{ model = "{base}" }}]\n')
    line = merge_error(capsys, config, tmp_path / "out")
    assert f"{config}:2" in line and "dtype" in line


def test_unreadable_config(tmp_path, capsys):
    line = merge_error(capsys, tmp_path / "missing.toml", tmp_path / "out")
    assert "missing.toml" in line


def test_exit_code_and_single_line_from_the_real_command(base, tmp_path):
    result = run_cli_process("merge", "--method", "nope", f"{base}:1", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("mergebot: error:")


def test_weights_that_cancel_cannot_be_normalized(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", base=base, seed=1)
    line = merge_error(capsys, "--method", "linear", f"{base}:1", f"{other}:-1", tmp_path / "out")
    assert "weights sum to zero" in line


def test_density_outside_unit_interval(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", base=base, seed=1)
    args = ("--method", "ties", "--base-model", base, f"{other}:1", "--set", "density=0", tmp_path / "out")
    line = merge_error(capsys, *args)
    assert "parameters.density" in line


def test_existing_directory_that_is_not_a_merge_is_never_replaced(base, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_cli("merge", "--method", "linear", f"{base}:1", out) == 2
    assert "not a mergebot output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_slice_key_mergekit_applies_but_mergebot_lacks_is_refused_with_key_and_line(base, tmp_path, capsys):
    """mergekit applies a slice's own parameters; mergebot does not have them, so it refuses rather than ignore."""
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n"
        "    parameters: {scale: 0.5}\n"
    )
    line = merge_error(capsys, config, tmp_path / "out")
    assert f"{config}:6: slices[0].parameters: mergekit applies it" in line


def test_bad_shard_size_names_file_and_line(base, tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text(f'merge_method = "passthrough"\nmodels = [{{ model = "{base}" }}]\nout_shard_size = "big"\n')
    line = merge_error(capsys, config, tmp_path / "out")
    assert f"{config}:3: out_shard_size:" in line and "'big'" in line
