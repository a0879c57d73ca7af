"""Broken checkpoints for bad-input tests: pickle-only weights, corrupt safetensors files, a poisoned tensor, an
index that disagrees with its shards. Each starts from a good `mergebot.synthetic.make_model` directory."""

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergebot.dev.synthetic import make_model

INDEX = "model.safetensors.index.json"


def make_pickle_model(path: Path, **kwargs: object) -> Path:
    """A model directory whose only weights are `pytorch_model.bin` (torch.save), as old checkpoints ship."""
    make_model(path, **kwargs)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (path / INDEX).unlink(missing_ok=True)
    torch.save(tensors, path / "pytorch_model.bin")
    return path


def truncate(file: Path, keep: int | None = None) -> None:
    """Cut a file to `keep` bytes (default: half), as an interrupted download leaves it."""
    size = file.stat().st_size
    with file.open("r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


def inflate_header_length(file: Path) -> None:
    """Make a safetensors file's 8-byte header length claim more bytes than the file has."""
    size = file.stat().st_size
    with file.open("r+b") as f:
        f.write(struct.pack("<Q", size + 1))


def file_of(model_dir: Path, name: str) -> Path:
    """The safetensors file holding tensor `name`."""
    if (model_dir / INDEX).exists():
        return model_dir / json.loads((model_dir / INDEX).read_text())["weight_map"][name]
    return model_dir / "model.safetensors"


def set_value(model_dir: Path, name: str, value: float = float("nan")) -> Path:
    """Overwrite the first element of tensor `name` (default NaN) in place on disk; returns the file changed."""
    file = file_of(model_dir, name)
    tensors = load_file(file)
    tensors[name].view(-1)[0] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def drop_from_index(model_dir: Path, name: str) -> None:
    """Remove `name` from the index's weight_map; the shard still holds it."""
    index = json.loads((model_dir / INDEX).read_text())
    del index["weight_map"][name]
    (model_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def add_tensor(model_dir: Path, name: str, tensor: torch.Tensor) -> None:
    """Store an extra tensor in the first weight file (and the index, when there is one)."""
    index_path = model_dir / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
        file = model_dir / sorted(set(index["weight_map"].values()))[0]
        index["weight_map"][name] = file.name
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    else:
        file = model_dir / "model.safetensors"
    tensors = load_file(file)
    tensors[name] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
