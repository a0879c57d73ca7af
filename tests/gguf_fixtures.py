"""Synthetic models llama.cpp can read: the synthetic Llama checkpoints with a byte-level BPE tokenizer (the kind
GPT-2, Llama 3, Qwen2 and SmolLM2 use) in place of their word-level one, which no GGUF tokenizer model can hold."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mergebot.dev.synthetic import DEFAULT_VOCAB, SPECIAL_TOKENS

EVAL_TEXT = Path(__file__).parent.parent / "mergebot" / "data" / "eval.txt"


def bpe_tokenizer(vocab: int = DEFAULT_VOCAB) -> Tokenizer:
    """Byte-level BPE trained on the eval text up to `vocab` tokens, the synthetic models' special tokens first (the
    same ids: <unk> 0, <s> 1, </s> 2), so it replaces their tokenizer without touching a tensor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(EVAL_TEXT.read_text(encoding="utf-8").splitlines(), trainer)
    assert tokenizer.get_vocab_size() == vocab, "the eval text gives enough merges for the synthetic vocabulary"
    return tokenizer


def use_bpe(model_dir: Path) -> None:
    """Replace a synthetic model's tokenizer.json with the byte-level BPE one (its other tokenizer files stay)."""
    (model_dir / "tokenizer.json").write_text(bpe_tokenizer().to_str(pretty=True) + "\n")
