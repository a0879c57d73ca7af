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
from mergebot.pipeline.architecture import parameter_names
from mergebot.pipeline.facts import ModelFacts
from mergebot.pipeline.perplexity import Signature, load_model, load_tokenizer, measure, one_line, token_ids
from mergebot.pipeline.probe import ProbeResult, Prompt, probe_digest, run_probe


@dataclass(frozen=True)
class ParentResult:
    """A parent's signature and the revision it belongs to (`cached`: taken from the cache, not measured)."""

    name: str
    path: Path
    revision: str
    signature: Signature
    cached: bool
    probe: ProbeResult | None = None
    """Its behaviour probe (None without a chat template to render the prompts with)."""

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

    def get_probe(self, name: str, revision: str, digest: str) -> ProbeResult | None:
        try:
            tensors = load(self._path(name, revision, digest).read_bytes())
            stopped, eot = tensors["stopped"], tensors["eot_prob"]
        except (OSError, ValueError, KeyError, SafetensorError):
            return None
        if stopped.ndim != 1 or stopped.shape != eot.shape or not len(stopped):
            return None
        return ProbeResult([bool(s) for s in stopped], [float(p) for p in eot])

    def put_probe(self, name: str, revision: str, digest: str, result: ProbeResult) -> None:
        tensors = {"stopped": torch.tensor(result.stopped, dtype=torch.bool), "eot_prob": torch.tensor(result.eot_prob)}
        with contextlib.suppress(OSError):
            write_atomic(self._path(name, revision, digest), save(tensors))

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
    prompts: list[Prompt] = (),
    facts: dict[str, ModelFacts] | None = None,
    measuring: Callable[[str], None] | None = None,
) -> list[ParentResult]:
    """Each parent's signature and probe result (the probe where `facts` gives it a chat template to render the
    prompts with), from `cache` when it holds this revision measured this way; a parent is loaded only when one of
    the two is missing. `measuring` is told each parent's name as its turn comes (progress)."""
    facts = facts or {}
    results = []
    for name, parent in parents.items():
        if measuring is not None:
            measuring(name)
        if not parent.path.is_dir():
            raise ModelError(f"parent {name}: {parent.path} is not a directory")
        own = facts.get(name)
        wants_probe = bool(prompts) and own is not None and own.turn_end_id is not None and bool(own.stop_ids)
        digest = probe_digest(list(prompts)) if wants_probe else ""
        signature = cache.get(name, parent.revision, measure_digest) if cache is not None else None
        probe = cache.get_probe(name, parent.revision, digest) if cache is not None and wants_probe else None
        cached = signature is not None and (probe is not None or not wants_probe)
        if not cached:
            model, ids = _load_parent(name, parent, text)
            if signature is None:
                signature = measure(model, ids, window, max_windows).signature
                if cache is not None and math.isfinite(signature.ppl):
                    cache.put(name, parent.revision, measure_digest, signature)
            if wants_probe and probe is None and math.isfinite(signature.ppl):
                probe = run_probe(model, own, list(prompts))
                if cache is not None and probe is not None:
                    cache.put_probe(name, parent.revision, digest, probe)
            del model
        results.append(ParentResult(name, parent.path, parent.revision, signature, cached, probe))
    return results


def _load_parent(name: str, parent: Parent, text: str) -> tuple[torch.nn.Module, list[int]]:
    """A parent loaded as the merge read it (its adapter applied), and the eval text's ids in its tokenizer."""
    try:
        tokenizer = load_tokenizer(parent.path)
        model = load_model(parent.path)
    except Exception as exc:  # any failure to load a parent is an input error, not a gate result
        raise ModelError(f"parent {name}: {parent.path} cannot be loaded for validation ({one_line(exc)})") from exc
    if parent.model is not None and parent.model.adapter is not None:
        _apply_adapter(name, model, parent.model)
    return model, token_ids(tokenizer, text)[0]


def _apply_adapter(name: str, model: torch.nn.Module, merged: InputModel) -> None:
    """The loaded base becomes the input the merge read: each tensor its adapter changes, in the model's dtype.
    The adapted tensors carry the checkpoint's names, which transformers renames on load (vision-language models)."""
    state = model.state_dict()
    loaded_as = parameter_names(model, list(merged.tensors))
    with torch.no_grad():
        for tensor, value in adapted_tensors(merged):
            if loaded_as[tensor] not in state:
                raise ModelError(f"parent {name}: the loaded model has no parameter {tensor} for its adapter to change")
            state[loaded_as[tensor]].copy_(value)
