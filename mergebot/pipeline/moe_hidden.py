"""The `hidden` routers of a mixture of experts: mergekit-moe 0.1.5's formula, run one decoder layer at a time.

mergekit-moe (`gate_mode: hidden`, the same as `hidden_last`) runs the whole base model on each expert's prompts
and, for layer i, takes the hidden state entering decoder layer i (index i of transformers' `hidden_states`: the
embeddings for layer 0) at the last token of each prompt, averages it over the expert's positive prompts, subtracts
the same average over its negative prompts (when it has any) and scales the difference to unit length (a norm
clamped at 1e-8). Each prompt is the tokenizer's BOS text followed by the prompt, tokenized without added special
tokens. `hidden_avg` takes the mean over the prompt's tokens instead of the last one.

Here the base never loads whole: one decoder layer's weights are read from its safetensors at a time, in float32,
and the hidden states of every distinct prompt are carried from layer to layer. mergekit batches the prompts with
left padding that attention masks out, so each prompt's last token sees only its own tokens, as here where each
prompt runs alone; mergekit runs the model in bfloat16, here everything is float32.

It lives in the pipeline because it needs transformers' decoder layers, which the merge engine never imports:
`ALL_ROUTERS` adds its three modes to the merge layer's own routers; the pipeline hands them to `run_moe`, which calls
one only when a shard holding a router is written.
"""

from collections.abc import Callable

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mergebot.config.moe import Expert
from mergebot.errors import ModelError
from mergebot.merge.io import TensorReader
from mergebot.merge.moe_router import ROUTERS, RouterFunction, RouterInputs
from mergebot.merge.source import InputModel
from mergebot.pipeline.perplexity import one_line

HIDDEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Base models whose embedding is a plain row lookup and whose decoder layers transformers runs alone."""
MAX_PROMPT_TOKENS = 4096
"""A router prompt is a sentence or a paragraph; attention over one costs its length squared."""
NORM_FLOOR = 1e-8
EMBED = "model.embed_tokens.weight"
LAYERS = "model.layers"

Summary = Callable[[torch.Tensor], torch.Tensor]
"""What a mode keeps of one prompt's (1, tokens, hidden) states entering a layer: a (hidden,) vector."""


def _last_token(states: torch.Tensor) -> torch.Tensor:
    return states[0, -1].clone()


def _token_mean(states: torch.Tensor) -> torch.Tensor:
    return states[0].sum(dim=0) / states.shape[1]


def hidden_last(inputs: RouterInputs) -> dict[int, np.ndarray]:
    """`hidden` and `hidden_last`: the state at each prompt's last token."""
    return _gate_vectors(inputs, _last_token, equal_lengths=False)


def hidden_avg(inputs: RouterInputs) -> dict[int, np.ndarray]:
    """`hidden_avg`: each prompt's state averaged over its tokens."""
    return _gate_vectors(inputs, _token_mean, equal_lengths=True)


def _gate_vectors(inputs: RouterInputs, summary: Summary, equal_lengths: bool) -> dict[int, np.ndarray]:
    """Layer → (experts, hidden) float32: row r is the unit-length router vector of `inputs.experts[r]`."""
    base = inputs.base
    config = _base_config(base)
    if config.num_hidden_layers != inputs.layers or config.hidden_size != inputs.hidden:
        raise ModelError(
            f"model {base.label}: transformers reads {config.num_hidden_layers} layers of width "
            f"{config.hidden_size} from its config.json, the mixture {inputs.layers} of {inputs.hidden}"
        )
    token_ids = _tokenize(base, inputs.experts, config)
    if equal_lengths:
        _refuse_padding(base, inputs.experts, token_ids)
    states = {prompt: _embed(base, ids) for prompt, ids in token_ids.items()}
    kept: dict[str, list[torch.Tensor]] = {prompt: [] for prompt in token_ids}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    decoder = skeleton.get_decoder()
    rotary = type(decoder.rotary_emb)(config=config)
    with torch.inference_mode(), TensorReader() as reader:
        for index in range(inputs.layers):
            for prompt, hidden in states.items():
                kept[prompt].append(summary(hidden))
            if index == inputs.layers - 1:
                break  # the last layer's output is no layer's input
            layer = decoder.layers[index]
            _load_layer(base, reader, layer, f"{LAYERS}.{index}.")
            for prompt, hidden in states.items():
                states[prompt] = _run_layer(layer, rotary, hidden)
            layer.to("meta")
    rows = np.stack([_gate_row(expert, kept) for expert in inputs.experts], axis=1)
    return {layer: np.ascontiguousarray(rows[layer]) for layer in range(inputs.layers)}


def _gate_row(expert: Expert, kept: dict[str, list[torch.Tensor]]) -> np.ndarray:
    """(layers, hidden): the positive prompts' mean state less the negatives', at unit length."""
    vector = _mean_states(expert.positive_prompts, kept)
    if expert.negative_prompts:
        vector = vector - _mean_states(expert.negative_prompts, kept)
    vector = vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    return vector.numpy()


def _mean_states(prompts: tuple[str, ...], kept: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    stacked = torch.stack([torch.stack(kept[prompt]) for prompt in prompts])  # (prompts, layers, hidden)
    return stacked.sum(dim=0) / len(prompts)


def _refuse_padding(base: InputModel, experts: tuple[Expert, ...], token_ids: dict[str, list[int]]) -> None:
    """mergekit-moe's `hidden_avg` averages over its batch's padding too (BOS tokens that attend nowhere), which
    says nothing of the prompts; mergebot computes it only where the prompts of a list are equally long."""
    for number, expert in enumerate(experts, 1):
        for kind, prompts in (("positive", expert.positive_prompts), ("negative", expert.negative_prompts)):
            lengths = {len(token_ids[prompt]) for prompt in prompts}
            if len(lengths) > 1:
                raise ModelError(
                    f"expert {number} ({expert.model}): gate_mode hidden_avg with {kind} prompts of "
                    f"{min(lengths)} to {max(lengths)} tokens, which mergekit-moe averages with its padding; "
                    "mergebot does not reproduce that (use hidden, or prompts of equal length)"
                )


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
        raise ModelError(f"model {base.label}: config.json does not load in transformers: {one_line(error)}") from error
    if config.num_hidden_layers < 1:
        raise ModelError(
            f"model {base.label}: config.json has no layers (num_hidden_layers {config.num_hidden_layers})"
        )
    return config


def _tokenize(base: InputModel, experts: tuple[Expert, ...], config: PretrainedConfig) -> dict[str, list[int]]:
    """Each distinct prompt's token ids, as mergekit-moe tokenizes it: BOS text + prompt, no special tokens added."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(
            f"model {base.label}: its tokenizer does not load in transformers: {one_line(error)}"
        ) from error
    bos = tokenizer.bos_token or ""
    embed = base.tensors.get(EMBED)
    if embed is None:
        raise ModelError(f"model {base.label}: no {EMBED} for the hidden router")
    window = getattr(config, "sliding_window", None) or MAX_PROMPT_TOKENS
    ids: dict[str, list[int]] = {}
    for expert in experts:
        for prompt in (*expert.positive_prompts, *expert.negative_prompts):
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


ALL_ROUTERS: dict[str, RouterFunction] = {
    **ROUTERS,
    "hidden": hidden_last,
    "hidden_last": hidden_last,
    "hidden_avg": hidden_avg,
}
