"""`mergebot merge` end to end on synthetic Llama models: numbers, layout, vocab, determinism, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mergebot.dev.synthetic import make_model
from tests.helpers import load_tensors, read_json, run_cli, run_cli_process, tree_digest

SHARD = "40KB"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes, sharded, plus a fine-tune with a larger vocabulary."""
    root = tmp_path_factory.mktemp("family")
    base = make_model(root / "base", shard_size=60_000)
    return {
        "base": base,
        "ft1": make_model(root / "ft1", base=base, seed=1, shard_size=60_000, noise=0.05),
        "ft2": make_model(root / "ft2", base=base, seed=2, noise=0.05),
        "wide": make_model(root / "wide", base=base, seed=3, extra_tokens=["<think>", "</think>"], noise=0.05),
    }


def bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within bf16 rounding of the float32 reference."""
    torch.testing.assert_close(actual.float(), expected.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_linear_matches_weighted_average_and_loads(family, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        "merge", "--method", "linear", f"{family['ft1']}:0.6", f"{family['ft2']}:0.2", out, "--out-shard-size", SHARD
    )
    assert code == 0
    a, b, merged = load_tensors(family["ft1"]), load_tensors(family["ft2"]), load_tensors(out)
    assert merged.keys() == a.keys()
    for name in a:
        bf16_close(merged[name], (0.6 * a[name].float() + 0.2 * b[name].float()) / 0.8)
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert len(set(index["weight_map"].values())) > 1
    config = read_json(out / "config.json")
    assert config["vocab_size"] == merged["model.embed_tokens.weight"].shape[0]
    assert config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (family["ft1"] / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").exists()
    model = LlamaForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    assert torch.isfinite(logits).all()
    shard_lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"shard"' in line]
    assert len(shard_lines) == len(set(index["weight_map"].values()))
    assert all(line["outcome"] == "computed" for line in shard_lines)


def test_slerp_gradient_and_filters_follow_layers(family, tmp_path):
    config = write_toml(
        tmp_path / "slerp.toml",
        f"""
merge_method = "slerp"
base_model = "{family["base"]}"
models = [{{ model = "{family["base"]}" }}, {{ model = "{family["ft1"]}" }}]
dtype = "float32"
[parameters]
t = [{{ filter = "self_attn", value = [0.0, 1.0] }}, {{ filter = "mlp", value = [1.0, 0.5, 0.0] }}, {{ value = 0.3 }}]
""",
    )
    out = tmp_path / "out"
    assert run_cli("merge", config, out) == 0
    base, other, merged = load_tensors(family["base"]), load_tensors(family["ft1"]), load_tensors(out)
    layers = 4
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        layer = int(name.split(".")[2]) if ".layers." in name else None
        position = layer / (layers - 1) if layer is not None else 0.0
        if "self_attn" in name:
            t = position
        elif "mlp" in name:
            t = 1.0 - position
        else:
            t = 0.3
        expected = reference_slerp(t, base[name].float(), other[name].float())
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"].float()
    )


def reference_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.flatten().double(), v1.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def test_ties_and_task_arithmetic_from_mergekit_yaml(family, tmp_path):
    config = tmp_path / "ties.yml"
    config.write_text(
        f"""
merge_method: task_arithmetic
base_model: {family["base"]}
models:
  - model: {family["ft1"]}
    parameters: {{weight: 0.7}}
  - model: {family["ft2"]}
    parameters: {{weight: 0.5}}
parameters:
  lambda: 0.9
dtype: float32
"""
    )
    out = tmp_path / "out"
    assert run_cli("merge", config, out) == 0
    base, a, b, merged = (load_tensors(p) for p in (family["base"], family["ft1"], family["ft2"], out))
    for name in base:
        expected = base[name].float() + 0.9 * (
            0.7 * (a[name].float() - base[name].float()) + 0.5 * (b[name].float() - base[name].float())
        )
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_passthrough_slices_stack_and_renumber_layers(family, tmp_path):
    config = write_toml(
        tmp_path / "frank.toml",
        f"""
merge_method = "passthrough"
[[slices]]
sources = [{{ model = "{family["ft1"]}", layer_range = [0, 3] }}]
[[slices]]
sources = [{{ model = "{family["ft2"]}", layer_range = [1, 4] }}]
""",
    )
    out = tmp_path / "out"
    assert run_cli("merge", config, out) == 0
    a, b, merged = load_tensors(family["ft1"]), load_tensors(family["ft2"]), load_tensors(out)
    assert read_json(out / "config.json")["num_hidden_layers"] == 6
    for layer in range(6):
        source, source_layer = (a, layer) if layer < 3 else (b, layer - 2)
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.equal(merged[name], source[f"model.layers.{source_layer}.mlp.up_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    model = LlamaForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_vocab_rows_follow_tokenizer_source(family, tmp_path):
    """wide has two extra tokens; with it as tokenizer source the base takes no part in their rows."""
    out = tmp_path / "out"
    code = run_cli(
        "merge",
        "--method",
        "linear",
        f"{family['base']}:0.5",
        f"{family['wide']}:0.5",
        out,
        "--tokenizer-source",
        family["wide"],
        "--dtype",
        "float32",
    )
    assert code == 0
    base, wide, merged = load_tensors(family["base"]), load_tensors(family["wide"]), load_tensors(out)
    rows = base["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == wide[name].shape[0] == rows + 2
        torch.testing.assert_close(merged[name][:rows], (base[name].float() + wide[name][:rows].float()) / 2)
        torch.testing.assert_close(merged[name][rows:], wide[name][rows:].float())
        assert torch.isfinite(merged[name]).all()
    assert read_json(out / "config.json")["vocab_size"] == rows + 2
    assert (out / "tokenizer.json").read_bytes() == (family["wide"] / "tokenizer.json").read_bytes()


def test_vocab_matched_by_token_not_by_row(tmp_path):
    """Two models each add a different token at the same row index: rows must not be mixed by index."""
    base = make_model(tmp_path / "base")
    left = make_model(tmp_path / "left", base=base, seed=1, extra_tokens=["<left>"])
    right = make_model(tmp_path / "right", base=base, seed=2, extra_tokens=["<right>", "<both>"])
    mixed = make_model(tmp_path / "mixed", base=base, seed=3, extra_tokens=["<both>", "<nobody>"])
    out = tmp_path / "out"
    code = run_cli(
        "merge",
        "--method",
        "linear",
        f"{left}:1",
        f"{right}:1",
        f"{mixed}:2",
        out,
        "--tokenizer-source",
        mixed,
        "--dtype",
        "float32",
    )
    assert code == 0
    lt, r, m, merged = (load_tensors(p)["model.embed_tokens.weight"].float() for p in (left, right, mixed, out))
    row = lt.shape[0] - 1  # the first extra row in every model
    both_in_right = row + 1
    assert merged.shape[0] == row + 2
    # <both>: right has it at row+1, mixed at row; left lacks it → weights 1 and 2 renormalized over right and mixed.
    torch.testing.assert_close(merged[row], (r[both_in_right] + 2 * m[row]) / 3)
    # <nobody>: only mixed has it.
    torch.testing.assert_close(merged[row + 1], m[row + 1])
    torch.testing.assert_close(merged[:row], (lt[:row] + r[:row] + 2 * m[:row]) / 4)


def test_tied_and_untied_models_merge(tmp_path):
    tied = make_model(tmp_path / "tied", tie_embeddings=True)
    untied = make_model(tmp_path / "untied", seed=5)
    out = tmp_path / "out"
    assert run_cli("merge", "--method", "linear", f"{untied}:1", f"{tied}:1", out, "--dtype", "float32") == 0
    t, u, merged = load_tensors(tied), load_tensors(untied), load_tensors(out)
    assert "lm_head.weight" not in t
    expected = (u["lm_head.weight"].float() + t["model.embed_tokens.weight"].float()) / 2
    torch.testing.assert_close(merged["lm_head.weight"], expected)


def test_two_runs_are_byte_identical(family, tmp_path):
    for name in ("one", "two"):
        code = run_cli(
            "merge",
            "--method",
            "dare_ties",
            "--base-model",
            family["base"],
            f"{family['ft1']}:0.5",
            f"{family['ft2']}:0.5",
            "--set",
            "density=0.6",
            tmp_path / name,
            "--out-shard-size",
            SHARD,
        )
        assert code == 0
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_rerun_reuses_every_shard_and_an_upstream_change_recomputes_only_its_shards(tmp_path, capsys):
    base = make_model(tmp_path / "base", shard_size=60_000)
    ft = make_model(tmp_path / "ft", base=base, seed=1, shard_size=60_000)
    out = tmp_path / "out"
    args = ("merge", "--method", "slerp", "--base-model", base, ft, "--set", "t=0.4", out, "--out-shard-size", SHARD)
    assert run_cli(*args) == 0
    first = tree_digest(out)
    capsys.readouterr()
    assert run_cli(*args) == 0
    outcomes = [json.loads(x)["outcome"] for x in capsys.readouterr().err.splitlines() if '"shard"' in x]
    assert outcomes and set(outcomes) == {"reused"}
    assert tree_digest(out) == first
    # Change one upstream shard of ft: only output shards reading tensors from it are recomputed.
    changed = sorted(ft.glob("model-*.safetensors"))[-1]
    tensors = load_tensors_file(changed)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2
    from safetensors.torch import save_file

    save_file(tensors, changed, metadata={"format": "pt"})
    assert run_cli(*args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if '"shard"' in x]
    index = read_json(out / "model.safetensors.index.json")["weight_map"]
    affected = {index[n] for n in tensors}
    computed = {line["shard"] for line in lines if line["outcome"] == "computed"}
    assert computed and computed <= affected
    assert index[name] in computed
    assert len(computed) < len(lines)


def load_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_kill_at_any_moment_then_resume_is_byte_identical(tmp_path):
    """A real child process killed with SIGKILL mid-merge; the rerun finishes only what was left."""
    base = make_model(tmp_path / "base", hidden=128, intermediate=256, layers=6, shard_size=200_000)
    ft = make_model(tmp_path / "ft", base=base, seed=1, shard_size=200_000)
    args = [
        "merge",
        "--method",
        "ties",
        "--base-model",
        str(base),
        f"{ft}:1.0",
        "--set",
        "density=0.5",
        "--out-shard-size",
        "60KB",
    ]
    reference = tmp_path / "reference"
    assert run_cli_process(*args, reference).returncode == 0
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    for delay in (0.0, 0.3):
        process = subprocess.Popen(
            [sys.executable, "-m", "mergebot.cli", *args, str(out)], stderr=subprocess.DEVNULL, env=os.environ
        )
        deadline = time.monotonic() + 60
        while not list(work.glob("model-*.safetensors")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not out.exists(), "the final OUT_DIR must not appear before the merge is complete"
    finished = {p.name: p.stat().st_ino for p in work.glob("model-*.safetensors")}
    assert finished
    result = run_cli_process(*args, out)
    assert result.returncode == 0, result.stderr
    outcomes = {json.loads(x)["shard"]: json.loads(x)["outcome"] for x in result.stderr.splitlines() if '"shard"' in x}
    assert all(outcomes[name] == "resumed" for name in finished)
    assert {p.name: p.stat().st_ino for p in out.glob("model-*.safetensors") if p.name in finished} == finished
    assert tree_digest(out) == tree_digest(reference)
    assert not work.exists()
