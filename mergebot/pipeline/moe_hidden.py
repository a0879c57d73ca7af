"""The `hidden` router of a mixture of experts: mergekit-moe 0.1.5's formula, run one decoder layer at a time.

mergekit-moe (`gate_mode: hidden`) runs the whole base model on each expert's prompts and, for layer i, takes the
hidden state entering decoder layer i (index i of transformers' `hidden_states`: the embeddings for layer 0) at the
last token of each prompt, averages it over the expert's positive prompts, subtracts the same average over its
negative prompts (when it has any) and scales the difference to unit length (a norm clamped at 1e-8). Each prompt is
the tokenizer's BOS text followed by the prompt, tokenized without added special tokens.

Here the base never loads whole: one decoder layer's weights are read from its safetensors at a time, in float32,
and the hidden states of every distinct prompt are carried from layer to layer. mergekit batches the prompts with
left padding that attention masks out, so each prompt's last token sees only its own tokens, as here where each
prompt runs alone; mergekit runs the model in bfloat16, here everything is float32.

It lives in the pipeline because it needs transformers' decoder layers, which the merge engine never imports; the
merge receives it as the function giving the router, and calls it only when a shard holding a router is written.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mergebot.errors import ModelError
from mergebot.merge.io import TensorReader
from mergebot.merge.source import InputModel

HIDDEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Base models whose embedding is a plain row lookup and whose decoder layers transformers runs alone."""
MAX_PROMPT_TOKENS = 4096
"""A router prompt is a sentence or a paragraph; attention over one costs its length squared."""
NORM_FLOOR = 1e-8
EMBED = "model.embed_tokens.weight"
LAYERS = "model.layers"


@dataclass(frozen=True)
class GatePrompts:
    """The prompts of one router row (an expert, or a shared expert that has prompts)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


def hidden_gate_vectors(base: InputModel, rows: Sequence[GatePrompts]) -> np.ndarray:
    """(layers, len(rows), hidden) float32: row r of layer i is the unit-length router vector of `rows[r]`."""
    config = _base_config(base)
    token_ids = _tokenize(base, rows, config)
    layers = config.num_hidden_layers
    states = {prompt: _embed(base, ids) for prompt, ids in token_ids.items()}
    last = {prompt: [] for prompt in token_ids}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    decoder = skeleton.get_decoder()
    rotary = type(decoder.rotary_emb)(config=config)
    with torch.inference_mode(), TensorReader() as reader:
        for index in range(layers):
            for prompt, hidden in states.items():
                last[prompt].append(hidden[0, -1].clone())
            if index == layers - 1:
                break  # the last layer's output is no layer's input
            layer = decoder.layers[index]
            _load_layer(base, reader, layer, f"{LAYERS}.{index}.")
            for prompt, hidden in states.items():
                states[prompt] = _run_layer(layer, rotary, hidden)
            layer.to("meta")
    return np.stack([_gate_row(row, last) for row in rows], axis=1)


def _gate_row(row: GatePrompts, last: dict[str, list[torch.Tensor]]) -> np.ndarray:
    """(layers, hidden): the mean last-token state of the positive prompts less the negatives', at unit length."""
    vector = _mean_states(row.positive, last)
    if row.negative:
        vector = vector - _mean_states(row.negative, last)
    vector = vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    return vector.numpy()


def _mean_states(prompts: tuple[str, ...], last: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    stacked = torch.stack([torch.stack(last[prompt]) for prompt in prompts])  # (prompts, layers, hidden)
    return stacked.sum(dim=0) / len(prompts)


def _base_config(base: InputModel) -> PretrainedConfig:
    model_type = base.config.get("model_type")
    if model_type not in HIDDEN_MODEL_TYPES:
        kinds = ", ".join(sorted(HIDDEN_MODEL_TYPES))
        raise ModelError(
            f"model {base.label}: gate_mode hidden runs the base model, whose model_type {model_type!r} mergebot "
            f"does not run layer by layer (it runs {kinds})"
        )
    try:
        config = AutoConfig.from_pretrained(base.path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"model {base.label}: config.json does not load in transformers: {error}") from error
    if config.num_hidden_layers < 1:
        raise ModelError(
            f"model {base.label}: config.json has no layers (num_hidden_layers {config.num_hidden_layers})"
        )
    return config


def _tokenize(base: InputModel, rows: Sequence[GatePrompts], config: PretrainedConfig) -> dict[str, list[int]]:
    """Each distinct prompt's token ids, as mergekit-moe tokenizes it: BOS text + prompt, no special tokens added."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"model {base.label}: its tokenizer does not load in transformers: {error}") from error
    bos = tokenizer.bos_token or ""
    embed = base.tensors.get(EMBED)
    if embed is None:
        raise ModelError(f"model {base.label}: no {EMBED} for the hidden router")
    window = getattr(config, "sliding_window", None) or MAX_PROMPT_TOKENS
    ids: dict[str, list[int]] = {}
    for row in rows:
        for prompt in (*row.positive, *row.negative):
            if prompt in ids:
                continue
            found = list(tokenizer(bos + prompt, add_special_tokens=False)["input_ids"])
            if not found:
                raise ModelError(f"model {base.label}: router prompt {prompt[:40]!r} has no tokens")
            if len(found) > min(window, MAX_PROMPT_TOKENS):
                raise ModelError(
                    f"model {base.label}: router prompt {prompt[:40]!r} is {len(found)} tokens long, over the "
                    f"{min(window, MAX_PROMPT_TOKENS)} a hidden router runs"
                )
            if max(found) >= embed.rows:
                raise ModelError(
                    f"model {base.label}: its tokenizer gives token id {max(found)}, beyond the {embed.rows} rows "
                    "of its embedding"
                )
            ids[prompt] = found
    return ids


def _embed(base: InputModel, ids: list[int]) -> torch.Tensor:
    """(1, tokens, hidden) float32: the embedding rows of `ids`, read one row at a time."""
    info = base.tensors[EMBED]
    with TensorReader() as reader:
        return torch.cat([reader.rows(info, token, token + 1) for token in ids]).unsqueeze(0)


def _load_layer(base: InputModel, reader: TensorReader, layer: torch.nn.Module, prefix: str) -> None:
    """Give the meta-device `layer` its float32 weights from the base's files, checked name by name and by shape."""
    weights: dict[str, torch.Tensor] = {}
    for name, expected in layer.state_dict().items():
        info = base.tensors.get(prefix + name)
        if info is None:
            raise ModelError(f"model {base.label}: no tensor {prefix + name} for the hidden router")
        if tuple(info.shape) != tuple(expected.shape):
            raise ModelError(
                f"model {base.label}: tensor {prefix + name} has shape {list(info.shape)}, its config.json says "
                f"{list(expected.shape)}"
            )
        weights[name] = reader.rows(info, 0, info.rows)
    layer.load_state_dict(weights, assign=True)


def _run_layer(layer: torch.nn.Module, rotary: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One prompt's states through one decoder layer, causally, positions from 0."""
    length = hidden.shape[1]
    positions = torch.arange(length).unsqueeze(0)
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    output = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary(hidden, positions))
    return output[0] if isinstance(output, tuple) else output
