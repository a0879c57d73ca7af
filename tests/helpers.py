"""Small helpers shared by tests: load a checkpoint's tensors, hash a directory, run the CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebot.cli import main

LLAMA_CPP_ABSENT = "llama.cpp is absent: it is the llama-cpp extra (pip install -c constraints.txt -e '.[llama-cpp]')"
"""Why llama.cpp's tests skip (`pytest.importorskip("llama_cpp", reason=LLAMA_CPP_ABSENT)`)."""


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (tests only: small models)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 per file name, to compare two outputs byte for byte."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def run_cli_process(*args: str | Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The real `mergebot` command in a child process (for exit codes, stderr and kill tests)."""
    return subprocess.run(
        [sys.executable, "-m", "mergebot.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
