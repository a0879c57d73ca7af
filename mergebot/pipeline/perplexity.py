"""Perplexity on the eval text: loading a checkpoint with transformers, cutting the text into windows, measuring,
and remembering each parent's perplexity so an unchanged parent is measured once."""

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mergebot.errors import ModelError
from mergebot.files import write_json_atomic

DEFAULT_WINDOW = 128
DEFAULT_MAX_WINDOWS = 32
PPL_CACHE_FILE = "parent_perplexity.json"


@dataclass(frozen=True)
class Parent:
    """A model to compare the merge with: its checkpoint directory and the revision its perplexity is remembered
    under (the Hub commit sha, or `mergebot.files.local_identity` for a local directory)."""

    path: Path
    revision: str


@dataclass(frozen=True)
class ParentResult:
    """A parent's perplexity and the revision it belongs to (`cached`: taken from the cache, not recomputed)."""

    name: str
    path: Path
    revision: str
    ppl: float
    cached: bool


class PerplexityCache(Protocol):
    """Where parent perplexities are remembered, per model name, revision and `measure` (how it was measured: a
    digest from `perplexity_measure`). `get` is None on a miss; `put` must not raise for a cache that cannot be
    written, since a lost entry only costs a recomputation. `JsonPerplexityCache` (CLI) and the daemon's state
    database (`mergebot.pipeline.run`) implement it."""

    def get(self, name: str, revision: str, measure: str) -> float | None: ...

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None: ...


def perplexity_measure(text: str, window: int, max_windows: int) -> str:
    """How a perplexity is measured, as one digest: the eval text's sha256, the window length and the window cap."""
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(f"{text_sha256}\0{window}\0{max_windows}".encode()).hexdigest()


class JsonPerplexityCache:
    """A PerplexityCache in one JSON file, `directory/parent_perplexity.json`, for the CLI (which has no state
    database). An unreadable file counts as empty; a write replaces the file atomically, so a crash never leaves it
    half-written, and a write that fails is dropped."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def get(self, name: str, revision: str, measure: str) -> float | None:
        return self._read().get(_cache_key(name, revision, measure))

    def put(self, name: str, revision: str, measure: str, ppl: float) -> None:
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            entries = self._read()
            entries[_cache_key(name, revision, measure)] = ppl
            write_json_atomic(self.directory / PPL_CACHE_FILE, entries)

    def _read(self) -> dict[str, float]:
        try:
            entries = json.loads((self.directory / PPL_CACHE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {k: float(v) for k, v in entries.items() if isinstance(v, int | float)}


def _cache_key(name: str, revision: str, measure: str) -> str:
    return f"{name}@{revision} {measure}"


def one_line(exc: BaseException) -> str:
    """An exception from transformers as one report line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: Path) -> torch.nn.Module:
    """One copy of the weights: transformers builds on meta and fills parameters straight from the mmapped
    safetensors, in the checkpoint's dtype."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    return model.eval()


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], float]:
    """Ids of the eval text, with the tokenizer's BOS first (how causal LMs see a document), and the unknown
    fraction."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    unk = tokenizer.unk_token_id
    unknown = sum(1 for i in ids if i == unk) / len(ids) if ids and unk is not None else 0.0
    if tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    return ids, unknown


def windows(ids: list[int], window: int, max_windows: int) -> list[list[int]]:
    """Fixed, non-overlapping windows; a trailing one shorter than two tokens predicts nothing and is dropped."""
    chunks = [ids[i : i + window] for i in range(0, min(len(ids), window * max_windows), window)]
    return [c for c in chunks if len(c) >= 2]


def perplexity(model: torch.nn.Module, ids: list[int], window: int, max_windows: int) -> tuple[float, int | None]:
    """exp(mean next-token NLL) over fixed, non-overlapping windows, log-softmax in float32.

    Returns (perplexity, index of the first window with NaN/inf logits or None).
    """
    total_nll = 0.0
    count = 0
    with torch.inference_mode():
        for k, chunk in enumerate(windows(ids, window, max_windows)):
            x = torch.tensor([chunk])
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            if not torch.isfinite(logits).all():
                return math.nan, k
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total_nll -= float(logp.gather(1, x[0, 1:, None]).sum(dtype=torch.float64))
            count += len(chunk) - 1
    if count == 0:
        return math.nan, None
    return math.exp(total_nll / count), None


def parent_perplexity(path: Path, text: str, window: int, max_windows: int) -> float:
    """Perplexity of one parent on the eval text with its own tokenizer (NaN when its logits are not finite)."""
    try:
        tokenizer = load_tokenizer(path)
        model = load_model(path)
    except Exception as exc:  # any failure to load a parent is an input error, not a gate result
        raise ModelError(f"parent {path}: cannot be loaded for perplexity ({one_line(exc)})") from exc
    ids, _ = token_ids(tokenizer, text)
    ppl, _ = perplexity(model, ids, window, max_windows)
    return ppl


def parent_results(
    parents: dict[str, Parent], text: str, window: int, max_windows: int, cache: PerplexityCache | None
) -> list[ParentResult]:
    """Each parent's perplexity, from `cache` when it holds this revision measured this way."""
    measure = perplexity_measure(text, window, max_windows)
    results = []
    for name, parent in parents.items():
        if not parent.path.is_dir():
            raise ModelError(f"parent {name}: {parent.path} is not a directory")
        if cache is not None and (ppl := cache.get(name, parent.revision, measure)) is not None:
            results.append(ParentResult(name, parent.path, parent.revision, ppl, cached=True))
            continue
        ppl = parent_perplexity(parent.path, text, window, max_windows)
        if cache is not None and math.isfinite(ppl):
            cache.put(name, parent.revision, measure, ppl)
        results.append(ParentResult(name, parent.path, parent.revision, ppl, cached=False))
    return results
