"""The merge's parents as the gate sees them: each one's signature on the eval text, remembered per revision so an
unchanged parent is measured once (a revision's weights never change)."""

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mergebot.errors import ModelError
from mergebot.files import write_atomic
from mergebot.merge.lora import adapted_tensors
from mergebot.merge.source import InputModel
from mergebot.pipeline.perplexity import Signature, load_model, load_tokenizer, measure, one_line, token_ids


@dataclass(frozen=True)
class ParentResult:
    """A parent's signature and the revision it belongs to (`cached`: taken from the cache, not measured)."""

    name: str
    path: Path
    revision: str
    signature: Signature
    cached: bool

    @property
    def ppl(self) -> float:
        return self.signature.ppl


@dataclass(frozen=True)
class Parent:
    """A model to compare the merge with: its checkpoint directory and the identity its signature is remembered
    under (the Hub commit sha, or `mergebot.files.local_identity` for a local directory)."""

    path: Path
    revision: str
    model: InputModel | None = None
    """The input as the merge read it, when that differs from the checkpoint at `path` (a LoRA adapter applied)."""


class SignatureCache:
    """Parent signatures as small safetensors files (perplexity and top tokens per position), one per
    (model, revision, measure) under `directory`. A file that cannot be read counts as missing, and one that cannot
    be written is dropped: the cache only saves a measurement."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def get(self, name: str, revision: str, measure: str) -> Signature | None:
        try:
            tensors = load(self._path(name, revision, measure).read_bytes())
            return Signature(float(tensors["ppl"]), tensors["ids"], tensors["top_ids"], tensors["top_logprobs"])
        except (OSError, ValueError, KeyError, SafetensorError):
            return None

    def put(self, name: str, revision: str, measure: str, signature: Signature) -> None:
        tensors = {
            "ppl": torch.tensor(signature.ppl, dtype=torch.float64),
            "ids": signature.ids.contiguous(),
            "top_ids": signature.top_ids.contiguous(),
            "top_logprobs": signature.top_logprobs.contiguous(),
        }
        with contextlib.suppress(OSError):
            write_atomic(self._path(name, revision, measure), save(tensors))

    def _path(self, name: str, revision: str, measure: str) -> Path:
        key = hashlib.sha256(f"{name}\0{revision}\0{measure}".encode()).hexdigest()
        return self.directory / f"{key}.safetensors"


def parent_results(
    parents: dict[str, Parent],
    text: str,
    window: int,
    max_windows: int,
    measure_digest: str,
    cache: SignatureCache | None,
    measuring: Callable[[str], None] | None = None,
) -> list[ParentResult]:
    """Each parent's signature, from `cache` when it holds this revision measured this way; `measuring` is told
    each parent's name as its turn comes (progress)."""
    results = []
    for name, parent in parents.items():
        if measuring is not None:
            measuring(name)
        if not parent.path.is_dir():
            raise ModelError(f"parent {name}: {parent.path} is not a directory")
        if cache is not None and (signature := cache.get(name, parent.revision, measure_digest)) is not None:
            results.append(ParentResult(name, parent.path, parent.revision, signature, cached=True))
            continue
        signature = _measure_parent(name, parent, text, window, max_windows)
        if cache is not None and math.isfinite(signature.ppl):
            cache.put(name, parent.revision, measure_digest, signature)
        results.append(ParentResult(name, parent.path, parent.revision, signature, cached=False))
    return results


def _measure_parent(name: str, parent: Parent, text: str, window: int, max_windows: int) -> Signature:
    """A parent's signature with its own tokenizer (perplexity NaN when its logits are not finite)."""
    try:
        tokenizer = load_tokenizer(parent.path)
        model = load_model(parent.path)
    except Exception as exc:  # any failure to load a parent is an input error, not a gate result
        raise ModelError(f"parent {name}: {parent.path} cannot be loaded for validation ({one_line(exc)})") from exc
    if parent.model is not None and parent.model.adapter is not None:
        _apply_adapter(name, model, parent.model)
    ids, _ = token_ids(tokenizer, text)
    return measure(model, ids, window, max_windows).signature


def _apply_adapter(name: str, model: torch.nn.Module, merged: InputModel) -> None:
    """The loaded base becomes the input the merge read: each tensor its adapter changes, in the model's dtype."""
    state = model.state_dict()
    with torch.no_grad():
        for tensor, value in adapted_tensors(merged):
            if tensor not in state:
                raise ModelError(f"parent {name}: the loaded model has no parameter {tensor} for its adapter to change")
            state[tensor].copy_(value)
