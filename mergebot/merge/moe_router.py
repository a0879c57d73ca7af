"""The routers of a mixture of experts, as pure functions of the base model and the experts' prompts.

`router_weights(mode, inputs, routers)` gives each layer's router as a float32 array (gated experts × hidden): a row per
expert, normalised, so that a token whose state looks like an expert's prompts scores highest for that expert.
`random` and `uniform_random` are seeded here (mergekit-moe draws them unseeded from torch, so no two of its runs
agree; mergebot's runs are byte-identical, and its draws are numpy's PCG64 streams, not torch's); `cheap_embed`
follows mergekit-moe 0.1.5's formula exactly, in float32. The `hidden` modes run the base model, so they live in the
pipeline (`mergebot.pipeline.moe_hidden.ALL_ROUTERS`), which passes them in.
"""

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mergebot.config.moe import Expert
from mergebot.errors import ConfigError, ModelError
from mergebot.files import TOKENIZER_FILES, read_json, read_small
from mergebot.merge.io import TensorReader
from mergebot.merge.source import InputModel
from mergebot.merge.tokenizer import read_document

SEED = 20260527
"""The random routers' (and experts' noise) seed: a constant, so every run writes the same bytes."""
FORMAT_VERSION = 1
EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class RouterInputs:
    """What a router is computed from: the base model and the experts it routes to, in row order."""

    base: InputModel
    experts: tuple[Expert, ...]
    layers: int
    hidden: int


RouterFunction = Callable[[RouterInputs], dict[int, np.ndarray]]
"""Router weights per layer (0 … layers−1), each float32 of shape (len(experts), hidden)."""


def router_weights(mode: str, inputs: RouterInputs, routers: Mapping[str, RouterFunction]) -> dict[int, np.ndarray]:
    """Each layer's router for `mode` (a `gate_mode`), computed by its function in `routers`."""
    function = routers.get(mode)
    if function is None:
        raise ConfigError(f"gate_mode: {mode} is not computed by this mergebot")
    weights = function(inputs)
    for layer in range(inputs.layers):
        if weights[layer].shape != (len(inputs.experts), inputs.hidden) or weights[layer].dtype != np.float32:
            raise AssertionError(f"router of layer {layer}: {weights[layer].shape} {weights[layer].dtype}")
    return weights


def router_fingerprint(mode: str, inputs: RouterInputs) -> str:
    """What the routers depend on: the mode, the shape, the prompts, and (for a router computed from the base) the
    base's weight files and tokenizer files, and for the hidden modes its config.json (rope, norms: how it runs)."""
    document: dict[str, object] = {
        "format": FORMAT_VERSION,
        "mode": mode,
        "layers": inputs.layers,
        "hidden": inputs.hidden,
        "prompts": [[list(e.positive_prompts), list(e.negative_prompts)] for e in inputs.experts],
    }
    if mode in ("random", "uniform_random"):
        document["seed"] = SEED
    else:
        base = inputs.base
        document["weights"] = sorted(base.file_sha256[path.name] for path in base.weight_files())
        files = (*TOKENIZER_FILES, "config.json") if mode.startswith("hidden") else TOKENIZER_FILES
        document["tokenizer"] = {
            name: hashlib.sha256(read_small(base.path / name, f"model {base.label}")).hexdigest()
            for name in files
            if (base.path / name).is_file()
        }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _random(inputs: RouterInputs) -> dict[int, np.ndarray]:
    """Standard normal, as mergekit's `random` (torch.randn) draws it."""
    shape = (len(inputs.experts), inputs.hidden)
    return {layer: _generator(layer).standard_normal(shape, dtype=np.float32) for layer in range(inputs.layers)}


def _uniform_random(inputs: RouterInputs) -> dict[int, np.ndarray]:
    """Uniform in ±1/√hidden, as torch initialises a Linear (mergekit's `uniform_random`)."""
    shape = (len(inputs.experts), inputs.hidden)
    scale = np.float32(math.sqrt(1.0 / inputs.hidden))
    return {
        layer: _generator(layer).random(shape, dtype=np.float32) * np.float32(2) * scale - scale
        for layer in range(inputs.layers)
    }


def _generator(layer: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([SEED, layer]))


def _cheap_embed(inputs: RouterInputs) -> dict[int, np.ndarray]:
    """mergekit's `cheap_embed`: per expert, the sum of the base's token embeddings over its positive prompts
    (each tokenised as the base's BOS text + the prompt, no other special tokens), normalised; minus the same of its
    negative prompts when it has some; normalised again (norms clamped at 1e-8). The same router in every layer.

    Summed and normalised with torch's float32 reductions in mergekit's order (over each prompt's tokens, then over
    the prompts), so the result is mergekit's to the bit."""
    import torch

    tokenizer = _PromptTokens(inputs.base)
    info = inputs.base.tensors.get(EMBEDDING)
    if info is None:
        raise ModelError(f"model {inputs.base.label} lacks tensor {EMBEDDING}, which gate_mode cheap_embed reads")
    vocab = min(int(inputs.base.config.get("vocab_size", info.rows)), info.rows)
    rows = []
    with TensorReader() as reader:

        def embedded(prompts: tuple[str, ...]) -> torch.Tensor:
            tokens = [tokenizer.ids(prompt) for prompt in prompts]
            if any(not 0 <= i < vocab for ids in tokens for i in ids):
                raise ModelError(f"model {inputs.base.label}: its tokenizer gives a token id past its embedding")
            length = max(len(ids) for ids in tokens)
            states = torch.zeros((len(tokens), length, inputs.hidden), dtype=torch.float32)  # padded on the left
            for prompt, ids in enumerate(tokens):
                for position, token in enumerate(ids, length - len(ids)):
                    states[prompt, position] = reader.rows(info, token, token + 1)[0]
            total = states.sum(dim=1).sum(dim=0, keepdim=True)
            return total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)

        for expert in inputs.experts:
            vector = embedded(expert.positive_prompts)
            if expert.negative_prompts:
                vector = vector - embedded(expert.negative_prompts)
            rows.append(vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    weights = torch.cat(rows).numpy()
    return {layer: weights for layer in range(inputs.layers)}


class _PromptTokens:
    """The base's tokenizer.json, as transformers' fast tokenizer encodes a prompt for mergekit-moe: its BOS token's
    text, then the prompt, no special tokens added."""

    def __init__(self, base: InputModel):
        document = read_document(base)
        if document is None:
            raise ModelError(f"model {base.label}: no tokenizer.json, which the router's prompts are tokenised with")
        try:
            self.tokenizer = Tokenizer.from_str(json.dumps(document))
        except Exception as error:  # the tokenizers library raises its own exception type for a malformed file
            raise ModelError(f"model {base.label}: cannot load its tokenizer.json ({error})") from error
        self.bos = _bos_text(base)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self.bos + prompt, add_special_tokens=False).ids


def _bos_text(base: InputModel) -> str:
    """The BOS token as tokenizer_config.json (or special_tokens_map.json) names it; empty when neither does."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = read_json(base.path / name, f"model {base.label}", required=False).get("bos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return token
    return ""


ROUTERS: dict[str, RouterFunction] = {
    "random": _random,
    "uniform_random": _uniform_random,
    "cheap_embed": _cheap_embed,
}
