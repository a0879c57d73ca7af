"""A mixture of experts on the real model: SmolLM2-135M-Instruct as the base, its two real fine-tunes as experts,
the `hidden` router. The MoE loads with its transformers class, passes the gate against its parents (base and
experts) with the chat probe, answers a question, and an update of one of an expert's files recomputes only the
output shards holding its tensors from that file."""

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from mergebot.dev import realmodel
from mergebot.errors import ExitCode
from tests.helpers import run_cli_process

pytest_plugins = ["tests.realmodel_fixtures"]

EXPERT_FILES = 3
"""The "code" expert is saved in this many files, as a larger fine-tune is: an update then touches one of them."""


def resharded(src: Path, dst: Path, files: int) -> Path:
    """A copy of a single-file checkpoint with its layers spread over `files` safetensors files and an index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(src / "model.safetensors")
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    names = [f"model-{k + 1:05d}-of-{files:05d}.safetensors" for k in range(files)]

    def file_of(tensor: str) -> str:
        layer = int(tensor.split(".")[2]) if tensor.startswith("model.layers.") else 0
        return names[layer * files // layers]

    weight_map = {tensor: file_of(tensor) for tensor in tensors}
    for name in names:
        part = {t: v for t, v in tensors.items() if weight_map[t] == name}
        save_file(part, dst / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def merge(config: Path, out: Path) -> dict[str, str]:
    """`mergebot merge`, as a process; each output shard's outcome (computed, reused...)."""
    result = run_cli_process("merge", config, out)
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return {e["shard"]: e["outcome"] for e in events if e.get("event") == "shard"}


def test_a_real_mixture_of_two_fine_tunes(real_base, real_fine_tunes, tmp_path):
    code = resharded(real_fine_tunes["code"], tmp_path / "code", EXPERT_FILES)
    config = tmp_path / "moe.yml"
    config.write_text(
        f"base_model: {real_base}\ngate_mode: hidden\nout_shard_size: 60MB\nexperts:\n"
        f"  - source_model: {code}\n    positive_prompts: ['Write a Python function that sorts a list']\n"
        f"  - source_model: {real_fine_tunes['licenses']}\n"
        "    positive_prompts: ['Permission is hereby granted, free of charge, to any person']\n"
    )
    out = tmp_path / "moe"
    first = merge(config, out)
    assert set(first.values()) == {"computed"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    validated = run_cli_process("validate", out)
    assert validated.returncode == ExitCode.OK, validated.stdout + validated.stderr[-2000:]
    for check in ("tensors", "load", "parents", "perplexity", "end of turn", "stops"):
        line = next(line for line in validated.stdout.splitlines() if line.strip().startswith(f"{check} "))
        assert " ok " in line, validated.stdout
    assert "Paris" in realmodel.chat_answer(out, "What is the capital of France?", max_new_tokens=12)

    # An update of one of the expert's files: the shards holding its tensors from that file, nothing else.
    index = json.loads((code / "model.safetensors.index.json").read_text())["weight_map"]
    updated = f"model-00002-of-{EXPERT_FILES:05d}.safetensors"
    tensors = load_file(code / updated)
    save_file({k: v * 1.01 for k, v in tensors.items()}, code / updated, metadata={"format": "pt"})
    layers = {int(name.split(".")[2]) for name, file in index.items() if file == updated and ".mlp." in name}
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    holding = {
        file for name, file in weight_map.items() if ".mlp.experts." in name and int(name.split(".")[2]) in layers
    }
    second = merge(config, out)
    assert holding and {shard for shard, outcome in second.items() if outcome == "computed"} == holding
    assert len(holding) < len(second)
