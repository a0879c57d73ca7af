"""Tiny random checkpoints of the GGUF families with real BPE tokenizers trained here on the eval text: a byte-level
one (GPT-2/SmolLM style, ChatML specials and template, one added non-special token) and a SentencePiece-style one
with byte fallback (Llama 2/Mistral/Gemma style), so a conversion writes both of llama.cpp's tokenizer models.

Weights are scaled up from transformers' tiny initialisation so that attention is sharp: a wrong rotary layout or
norm convention changes the logits, where near-uniform attention would hide it.
"""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tests.tiny_architectures import ARCHITECTURES

EVAL_TEXT = (Path(__file__).parent.parent / "mergebot" / "data" / "eval.txt").read_text()
VOCAB = 384
"""Embedding rows: more than either tokenizer holds, so the GGUF pads the vocabulary as real models do."""
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
SPM_FAMILIES = ("llama", "gemma", "gemma2")
"""Given the SentencePiece-style tokenizer (as their real models are); the others get the byte-level one."""


def build(family: str, path: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random checkpoint of `family` with a tokenizer, saved in `dtype` as a merge would be."""
    config = ARCHITECTURES[family].config()
    config.vocab_size = VOCAB
    config.max_position_embeddings = 256
    spm = family in SPM_FAMILIES
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (1, 2, 2)
    if family == "qwen3":
        config.head_dim = 128  # as in every real Qwen3; transformers' GGUF loader assumes it
    if family == "gemma2":
        config.query_pre_attn_scalar = config.head_dim  # as in the real 2B and 9B; llama.cpp assumes it
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
            elif name.endswith("norm.weight"):
                parameter.add_(0.1 * torch.randn(parameter.shape))
    model.to(dtype).save_pretrained(path)
    (spm_tokenizer if spm else byte_level_tokenizer)(path)
    return path


def byte_level_tokenizer(path: Path) -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([EVAL_TEXT], trainer)
    tokenizer.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    _save(path, tokenizer, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"})


def spm_tokenizer(path: Path) -> None:
    """BPE over "▁"-joined words with byte fallback, ids: <unk>, <s>, </s>, the 256 byte tokens, then the rest."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trained.train_from_iterator(
        ["▁" + line for line in EVAL_TEXT.splitlines()], trainers.BpeTrainer(vocab_size=100, show_progress=False)
    )
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(
        models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    _save(path, tokenizer, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def _save(path: Path, tokenizer: Tokenizer, specials: dict[str, str]) -> None:
    (path / "tokenizer.json").write_text(tokenizer.to_str())
    settings = {**specials, "pad_token": specials["eos_token"], "chat_template": CHATML}
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
