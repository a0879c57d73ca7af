"""An input model on disk: its safetensors tensors, config and tokenizer files, and each file's sha256."""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mergebot.errors import ModelError
from mergebot.files import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, read_json
from mergebot.merge.io import TensorInfo, read_header


@dataclass(frozen=True)
class AdapterSource:
    """A LoRA adapter applied to a model (`mergebot.merge.lora`): its directory and the revision read (None for a
    local one)."""

    label: str
    path: Path
    revision: str | None = None


@dataclass
class InputModel:
    """One model as the merge reads it; `label` is what the user wrote (a path or a repo id, `base+adapter` for a
    model with a LoRA adapter applied)."""

    label: str
    path: Path
    tensors: dict[str, TensorInfo]
    config: dict
    revision: str | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)
    """By file name; an adapter's file is named unlike any checkpoint shard (adapter_model.safetensors)."""
    adapter: AdapterSource | None = None

    def weight_files(self) -> list[Path]:
        files = {info.file for info in self.tensors.values()}
        return sorted(files | {info.lora.a.file for info in self.tensors.values() if info.lora})

    def sha256_of(self, info: TensorInfo) -> str:
        """What the tensor's values come from: its file's sha256, and for a LoRA-updated weight also the adapter
        file's and the scale (set in adapter_config.json, not in the weights)."""
        digest = self.file_sha256[info.file.name]
        if info.lora is None:
            return digest
        adapter = self.file_sha256[info.lora.a.file.name]
        return hashlib.sha256(f"{digest}+{adapter}*{info.lora.scale!r}".encode()).hexdigest()

    @property
    def pins(self) -> tuple[str | None, str | None]:
        """(the revision merged, its adapter's), for `MergeConfig.pinned`."""
        return self.revision, self.adapter.revision if self.adapter else None


def open_model(label: str, path: Path, revision: str | None = None) -> InputModel:
    """Read a Hugging Face checkpoint directory (sharded or single-file safetensors); never load pickle."""
    if not path.is_dir():
        raise ModelError(f"model {label}: {path} is not a directory")
    index_path = path / INDEX_FILE
    if index_path.exists():
        files = _files_from_index(label, index_path)
    elif (path / SINGLE_FILE).exists():
        files = {path / SINGLE_FILE: None}
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(
                f"model {label}: only pickle weights ({', '.join(pickles)}); mergebot reads safetensors only"
            )
        raise ModelError(f"model {label}: no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    tensors: dict[str, TensorInfo] = {}
    for file, expected in files.items():
        if not file.exists():
            raise ModelError(f"model {label}: {INDEX_FILE} names {file.name}, which is missing")
        found, _ = read_header(file)
        if expected is not None:
            missing = sorted(expected - found.keys())
            if missing:
                raise ModelError(f"model {label}: {file.name} lacks tensor {missing[0]} that {INDEX_FILE} maps to it")
            found = {name: info for name, info in found.items() if name in expected}
        for name, info in found.items():
            if name in tensors:
                first = tensors[name].file.name
                raise ModelError(f"model {label}: tensor {name} is stored twice ({first}, {file.name})")
            tensors[name] = info
    return InputModel(label, path, tensors, read_json(path / "config.json", label, required=False), revision)


def _files_from_index(label: str, index_path: Path) -> dict[Path, set[str]]:
    index = read_json(index_path, label, required=True)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"model {label}: {index_path} has no weight_map")
    files: dict[Path, set[str]] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or "/" in file_name or "\\" in file_name or file_name.startswith("."):
            raise ModelError(f"model {label}: {index_path} maps {name} to an unsafe file name {file_name!r}")
        if not file_name.endswith(".safetensors"):
            raise ModelError(f"model {label}: {index_path} maps {name} to {file_name}, not a safetensors file")
        files.setdefault(index_path.parent / file_name, set()).add(name)
    return files
