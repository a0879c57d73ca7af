"""How a model predicts the eval text: its perplexity and, per position, its most likely next tokens.

All windows go through the model in one batched pass, so each weight is read once per validation: a model whose
weights are memory-mapped (transformers keeps them so when the checkpoint's dtype is kept) is paged in once instead
of once per window, and anonymous memory stays at the activations. Logits are never held for the whole batch:
the vocabulary projection runs over a few hundred positions at a time.
"""

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from mergebot.pipeline.architecture import model_class

DEFAULT_WINDOW = 128
DEFAULT_MAX_WINDOWS = 32
TOP_TOKENS = 64
"""Tokens per position a parent's prediction keeps for the KL check: the rest of its probability mass is lumped
into one outcome, so the KL is exact up to the tail (and never larger than the full one)."""
_LOGIT_ELEMENTS = 1 << 24
"""float32 logits computed at once (64 MiB): positions per projection step = this / vocabulary size."""
_MEASURE_VERSION = 2


@dataclass(frozen=True)
class Signature:
    """A model's predictions on the eval text: what the gate compares a merge with its parents by."""

    ppl: float
    ids: torch.Tensor
    """[tokens] int64: the eval text's token ids it was measured on; signatures compare only on the same ids."""
    top_ids: torch.Tensor
    """[positions, TOP_TOKENS] int64: each position's most likely next tokens."""
    top_logprobs: torch.Tensor
    """[positions, TOP_TOKENS] float32: their log-probabilities."""


@dataclass(frozen=True)
class Measurement:
    """A measured model: its signature, the mean KL divergence of each reference's predictions from its own, and
    the first window whose logits were not finite (the signature is then meaningless)."""

    signature: Signature
    kl: list[float]
    bad_window: int | None


def measure_digest(text: str, window: int, max_windows: int) -> str:
    """How a signature is measured, as one digest: the eval text, the windows and the kept tokens."""
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    settings = f"{text_sha256}\0{window}\0{max_windows}\0{TOP_TOKENS}\0{_MEASURE_VERSION}"
    return hashlib.sha256(settings.encode()).hexdigest()


def one_line(exc: BaseException) -> str:
    """An exception from transformers as one report line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: Path) -> torch.nn.Module:
    """One copy of the weights: transformers builds on meta and fills parameters straight from the mmapped
    safetensors, in the checkpoint's dtype. A vision-language model loads whole (its image-text class); only its
    language model and head are run (`get_decoder`, `get_output_embeddings`), on text alone."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = model_class(config).from_pretrained(model_dir, dtype="auto", local_files_only=True)
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


def measure(
    model: torch.nn.Module, ids: list[int], window: int, max_windows: int, references: list[Signature] = ()
) -> Measurement:
    """Perplexity (exp of the mean next-token NLL, log-softmax in float32), top tokens, and the KL divergence
    KL(reference ‖ model) per position, averaged, for each reference (each must be measured on the same ids)."""
    chunks = windows(ids, window, max_windows)
    with _in_float32(model):
        return _measure(model, chunks, ids, references)


def _measure(
    model: torch.nn.Module, chunks: list[list[int]], ids: list[int], references: list[Signature]
) -> Measurement:
    hidden, targets, window_of = _final_hidden(model, chunks)
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    step = max(16, _LOGIT_ELEMENTS // head.weight.shape[0])
    nll = 0.0
    kl = [0.0] * len(references)
    top_ids, top_logprobs = [], []
    with torch.inference_mode():
        for start in range(0, len(targets), step):
            logits = head(hidden[start : start + step]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if not torch.isfinite(logits).all():
                bad_row = int((~torch.isfinite(logits)).any(-1).nonzero()[0]) + start
                empty = Signature(math.nan, torch.tensor(ids), torch.empty(0, TOP_TOKENS), torch.empty(0, TOP_TOKENS))
                return Measurement(empty, [math.nan] * len(references), int(window_of[bad_row]))
            logp = torch.log_softmax(logits, dim=-1)
            rows = slice(start, start + step)
            nll -= float(logp.gather(1, targets[rows, None]).sum(dtype=torch.float64))
            best = torch.topk(logp, TOP_TOKENS, dim=-1)
            top_ids.append(best.indices)
            top_logprobs.append(best.values)
            for index, reference in enumerate(references):
                kl[index] += _kl_sum(reference.top_logprobs[rows], logp.gather(1, reference.top_ids[rows]))
    count = len(targets)
    signature = Signature(math.exp(nll / count), torch.tensor(ids), torch.cat(top_ids), torch.cat(top_logprobs))
    return Measurement(signature, [total / count for total in kl], None)


@contextmanager
def _in_float32(model: torch.nn.Module) -> Iterator[None]:
    """Compute in float32 without a float32 copy of the model: bf16 matmuls are several times slower than float32
    ones on CPUs, and a whole copy would double memory. Each module's own parameters are cast just before it runs
    and dropped right after, so the weights stay in their mapped file and anonymous memory grows by one module's
    weights at most."""
    saved: dict[int, torch.Tensor] = {}

    def cast(module: torch.nn.Module, _args: object) -> None:
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.bfloat16, torch.float16):
                saved[id(param)] = param.data
                param.data = param.data.float()

    def restore(module: torch.nn.Module, _args: object, _output: object) -> None:
        for param in module.parameters(recurse=False):
            if id(param) in saved:
                param.data = saved.pop(id(param))

    handles = []
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            handles += [module.register_forward_pre_hook(cast), module.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _final_hidden(model: torch.nn.Module, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of the decoder over every window at once (right-padded: under causal attention no real
    token sees the padding). Returns the final hidden state of each predicting position, the token it predicts,
    and its window's index."""
    length = max(len(chunk) for chunk in chunks)
    batch = torch.zeros(len(chunks), length, dtype=torch.long)
    for row, chunk in enumerate(chunks):
        batch[row, : len(chunk)] = torch.tensor(chunk)
    with torch.inference_mode():
        states = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
    hidden = torch.cat([states[row, : len(chunk) - 1] for row, chunk in enumerate(chunks)])
    targets = torch.cat([batch[row, 1 : len(chunk)] for row, chunk in enumerate(chunks)])
    window_of = torch.cat([torch.full((len(chunk) - 1,), row) for row, chunk in enumerate(chunks)])
    return hidden, targets, window_of


def _kl_sum(reference_logp: torch.Tensor, model_logp: torch.Tensor) -> float:
    """Σ over positions of KL(P ‖ Q) on P's top tokens plus one outcome for the rest of each distribution."""
    p, q = reference_logp.double().exp(), model_logp.double().exp()
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - q.sum(-1)).clamp(min=1e-12)
    top = (p * (reference_logp.double() - model_logp.double())).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), 0.0)
    return float((top + rest).sum())
