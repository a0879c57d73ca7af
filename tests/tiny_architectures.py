"""Tiny random checkpoints of many architectures, built by transformers from its own config classes, and
"fine-tunes" of them (seeded noise on every tensor), for tests that merge and load them back.

Each `Architecture` also names, by hand, where its decoder layers are and its other stack (a vision tower), so a
test can check where mergebot put each per-layer value without asking mergebot's own layout code.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
}
"""The shared tiny shape: 3 layers, so a per-layer list has a first, a middle and a last layer."""
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}


@dataclass(frozen=True)
class Architecture:
    name: str
    config: Callable[[], transformers.PretrainedConfig]
    decoder: str
    """The prefix of the decoder layers' tensor names: layer N is decoder + "N."."""
    layers: int = 3
    vision: str | None = None
    """The prefix of the vision tower's layers, for a vision-language model."""
    vision_layers: int = 0
    image_text: bool = False
    """Built with AutoModelForImageTextToText rather than AutoModelForCausalLM."""


def _text(**extra) -> dict:
    return {**TEXT, **extra}


ARCHITECTURES = {
    a.name: a
    for a in [
        Architecture("llama", lambda: transformers.LlamaConfig(**_text()), "model.layers."),
        Architecture("mistral", lambda: transformers.MistralConfig(**_text()), "model.layers."),
        Architecture("qwen2", lambda: transformers.Qwen2Config(**_text()), "model.layers."),
        Architecture("qwen3", lambda: transformers.Qwen3Config(**_text(head_dim=8)), "model.layers."),
        Architecture("gemma", lambda: transformers.GemmaConfig(**_text(head_dim=8)), "model.layers."),
        Architecture("gemma2", lambda: transformers.Gemma2Config(**_text(head_dim=8)), "model.layers."),
        Architecture("phi3", lambda: transformers.Phi3Config(**_text(pad_token_id=0)), "model.layers."),
        Architecture("phi", lambda: transformers.PhiConfig(**_text()), "model.layers."),
        Architecture(
            "gpt2",
            lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=96, n_positions=64),
            "transformer.h.",
        ),
        Architecture(
            "gpt_bigcode",
            lambda: transformers.GPTBigCodeConfig(n_embd=32, n_layer=3, n_head=4, vocab_size=96, n_positions=64),
            "transformer.h.",
        ),
        Architecture(
            "falcon",
            lambda: transformers.FalconConfig(
                hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=96
            ),
            "transformer.h.",
        ),
        Architecture("gpt_neox", lambda: transformers.GPTNeoXConfig(**_text()), "gpt_neox.layers."),
        Architecture(
            "opt",
            lambda: transformers.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                vocab_size=96,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            "model.decoder.layers.",
        ),
        Architecture("stablelm", lambda: transformers.StableLmConfig(**_text()), "model.layers."),
        Architecture("starcoder2", lambda: transformers.Starcoder2Config(**_text()), "model.layers."),
        Architecture("olmo", lambda: transformers.OlmoConfig(**_text()), "model.layers."),
        Architecture("cohere", lambda: transformers.CohereConfig(**_text()), "model.layers."),
        Architecture(
            "mixtral",
            lambda: transformers.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2)),
            "model.layers.",
        ),
        Architecture(
            "qwen2_moe",
            lambda: transformers.Qwen2MoeConfig(
                **_text(num_experts=4, shared_expert_intermediate_size=32, mlp_only_layers=[1], **MOE)
            ),
            "model.layers.",
        ),
        Architecture(
            "qwen3_moe", lambda: transformers.Qwen3MoeConfig(**_text(num_experts=4, head_dim=8, **MOE)), "model.layers."
        ),
        Architecture(
            "llava",
            lambda: transformers.LlavaConfig(
                text_config=transformers.LlamaConfig(**_text()).to_dict(),
                vision_config={
                    "model_type": "clip_vision_model",
                    **VISION,
                    "image_size": 32,
                    "patch_size": 8,
                    "projection_dim": 32,
                },
                image_token_index=90,
            ),
            "language_model.model.layers.",
            vision="vision_tower.encoder.layers.",
            vision_layers=2,
            image_text=True,
        ),
        Architecture(
            # vision depth = text depth, so only the tensor names tell the language model from the vision tower
            "qwen2_vl",
            lambda: transformers.Qwen2VLConfig(
                text_config=_text(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                vision_config={
                    "depth": 3,
                    "embed_dim": 32,
                    "hidden_size": 32,
                    "num_heads": 4,
                    "mlp_ratio": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                },
                image_token_id=90,
                video_token_id=91,
                vision_start_token_id=92,
            ),
            "model.layers.",
            vision="visual.blocks.",
            vision_layers=3,
            image_text=True,
        ),
    ]
}


def build(architecture: Architecture, path: Path, seed: int = 0) -> Path:
    """A random float32 checkpoint of `architecture` saved by transformers as safetensors, with its config.json."""
    config = architecture.config()
    auto = transformers.AutoModelForImageTextToText if architecture.image_text else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def fine_tune(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A copy of `base` with seeded noise (scale × each tensor's RMS, at least scale × 0.02) on every tensor."""
    shutil.copytree(base, path)
    generator = torch.Generator().manual_seed(seed)
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name in sorted(tensors):
            tensor = tensors[name]
            rms = max(float(tensor.double().square().mean().sqrt()), 0.02)
            tensors[name] = tensor + scale * rms * torch.randn(tensor.shape, generator=generator)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def assert_loads(path: Path, layers: int) -> None:
    """The checkpoint loads, by the class its config.json names, with every key in place and `layers` decoder
    layers, and gives finite logits."""
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(path, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert model.config.get_text_config().num_hidden_layers == layers
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 7, 2, 9]])).logits
    assert torch.isfinite(logits).all()
