"""The tokenizer as llama.cpp reads it from GGUF metadata, built from the merge's tokenizer.json,
tokenizer_config.json and chat template: the vocabulary, its token types, the merges or scores, the special token
ids, whether a BOS is added, and the chat template, so llama.cpp tokenizes as transformers does and chats out of
the box.

Two tokenizer models, as tokenizer.json's model says: byte-level BPE ("gpt2", with the pre-tokenizer llama.cpp
must split by, named from tokenizer.json's own pre_tokenizer) and SentencePiece-style BPE with byte fallback
("llama", scored by merge rank). Anything else is refused in one line rather than written to tokenize wrongly.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from mergebot.errors import GgufError, GgufUnsupportedError
from mergebot.files import parse_json, read_small

_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {_WORDS + r"\p{N}{1,3}" + _REST: "llama3", _WORDS + r"\p{N}" + _REST: "qwen2"}
"""The Split regexes of Llama 3's and Qwen2's tokenizer.json, by the name of llama.cpp's matching pre-tokenizer."""
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
"""tokenizer_config.json's name of a special token, and GGUF's."""


@dataclass(frozen=True)
class Vocab:
    """Everything the GGUF's tokenizer.* keys hold."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_templates: dict[str, str]
    """The chat template ("default") and any named ones."""

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for key, token_id in self.special_ids.items():
            writer.add_uint32(
                f"tokenizer.ggml.{ {'unk': 'unknown', 'pad': 'padding'}.get(key, key) }_token_id", token_id
            )
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for name, template in self.chat_templates.items():
            key = gguf.Keys.Tokenizer.CHAT_TEMPLATE + ("" if name == "default" else f".{name}")
            writer.add_string(key, template)


def read_vocab(model_dir: Path, config: dict, vocab_size: int) -> Vocab:
    """The vocabulary of `vocab_size` entries (the embedding's rows; ids the tokenizer leaves unused are padding)."""
    where = str(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise GgufUnsupportedError(f"{where}: no tokenizer.json; a GGUF needs the tokenizer in it")
    tokenizer = _object(parse_json(read_small(path, where, GgufError), where, path.name, GgufError), path)
    settings_path = model_dir / "tokenizer_config.json"
    settings = {}
    if settings_path.exists():
        text = read_small(settings_path, where, GgufError)
        settings = _object(parse_json(text, where, settings_path.name, GgufError), settings_path)
    model = _object(tokenizer.get("model"), path)
    if model.get("type") != "BPE":
        raise GgufUnsupportedError(f"{path}: no GGUF for a {str(model.get('type'))[:20]} tokenizer (BPE only)")
    vocab = _object(model.get("vocab"), path)
    added = tokenizer.get("added_tokens") or []
    if not isinstance(added, list):
        raise GgufError(f"{path}: added_tokens is not a list")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in vocab.items():
        _place(tokens, types, text, token_id, gguf.TokenType.NORMAL, path)
    for entry in added:
        entry = _object(entry, path)
        kind = gguf.TokenType.CONTROL if entry.get("special") is True else gguf.TokenType.USER_DEFINED
        _place(tokens, types, entry.get("content"), entry.get("id"), kind, path, replace=True)
    byte_fallback = model.get("byte_fallback") is True
    merges = _merges(model.get("merges"), path)
    specials = _special_ids(settings, config, tokens)
    if byte_fallback:
        unk = model.get("unk_token")
        for i, text in enumerate(tokens):
            if text is not None and types[i] == gguf.TokenType.NORMAL:
                if BYTE_TOKEN.fullmatch(text):
                    types[i] = gguf.TokenType.BYTE
                elif text == unk:
                    types[i] = gguf.TokenType.UNKNOWN
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), i)
        scores = [-float(rank[text] + 1) if text in rank else 0.0 for text in tokens]
        model_name, pre, merge_list, space = "llama", None, None, _space_prefix(tokenizer, path)
    else:
        model_name, pre, merge_list, scores, space = "gpt2", _pre_tokenizer(tokenizer, path), merges, None, None
    add_bos, add_eos = _adds_specials(tokenizer, settings)
    return Vocab(
        model=model_name,
        pre=pre,
        tokens=[text if text is not None else f"[PAD{i}]" for i, text in enumerate(tokens)],
        types=[int(kind) for kind in types],
        scores=scores,
        merges=merge_list,
        special_ids=specials,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=space,
        chat_templates=_chat_templates(model_dir, settings),
    )


def _object(value: object, path: Path) -> dict:
    if not isinstance(value, dict):
        raise GgufError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _place(tokens: list, types: list, text: object, token_id: object, kind: int, path: Path, replace=False) -> None:
    if not isinstance(text, str) or type(token_id) is not int:
        raise GgufError(f"{path}: a token entry is not a string with an integer id")
    if not 0 <= token_id < len(tokens):
        raise GgufError(f"{path}: token id {token_id} is outside the model's {len(tokens)} embedding rows")
    if tokens[token_id] is not None and not (replace and tokens[token_id] == text):
        raise GgufError(f"{path}: token id {token_id} is given to two tokens")
    tokens[token_id], types[token_id] = text, kind


def _merges(value: object, path: Path) -> list[str]:
    """Merges as llama.cpp reads them, "left right", from either of tokenizer.json's two spellings."""
    merges = []
    for merge in value or []:
        if isinstance(merge, str) and merge.count(" ") == 1:
            merges.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            if " " in merge[0] or " " in merge[1]:
                raise GgufUnsupportedError(f"{path}: a merge of tokens holding spaces cannot be written to GGUF")
            merges.append(f"{merge[0]} {merge[1]}")
        else:
            raise GgufError(f"{path}: a merge is neither 'a b' nor a pair of strings")
    return merges


def _pre_tokenizer(tokenizer: dict, path: Path) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE; refused when it has none."""
    normalizer = tokenizer.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise GgufUnsupportedError(
            f"{path}: no GGUF for a byte-level tokenizer with a {normalizer.get('type')} normalizer"
        )
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps if isinstance(steps, list) else []:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "ByteLevel" and step.get("add_prefix_space") is not True:
            shape.append("bytes+split" if step.get("use_regex", True) else "bytes")
        elif kind == "Digits" and step.get("individual_digits") is True:
            shape.append("digits")
        elif kind == "Split" and isinstance(step.get("pattern"), dict) and step.get("behavior") == "Isolated":
            shape.append(SPLITS.get(step["pattern"].get("Regex"), "?"))
        else:
            shape.append("?")
    names = {
        ("bytes+split",): "gpt-2",
        ("digits", "bytes+split"): "smollm",
        ("llama3", "bytes"): "llama-bpe",
        ("qwen2", "bytes"): "qwen2",
    }
    name = names.get(tuple(shape))
    if name is None:
        raise GgufUnsupportedError(
            f"{path}: no GGUF for this byte-level pre-tokenizer (llama.cpp would split otherwise)"
        )
    return name


def _space_prefix(tokenizer: dict, path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Llama 2, Mistral) or not (Gemma). Its
    text may only have spaces made "▁" and that prefix added, as llama.cpp's SentencePiece tokenizer does; any other
    normalizer or pre-tokenizer is refused."""
    steps = []
    for part in (tokenizer.get("normalizer"), tokenizer.get("pre_tokenizer")):
        if isinstance(part, dict):
            inner = part.get("normalizers", part.get("pretokenizers"))
            steps += inner if isinstance(inner, list) else [part]
        elif part is not None:
            steps.append(part)
    prefix = False
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Prepend" and step.get("prepend") == "▁":
            prefix = True
        elif kind == "Metaspace" and step.get("replacement", "▁") == "▁":
            prefix = prefix or step.get("prepend_scheme", "always") in ("always", "first")
        elif not (kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "▁"):
            shown = str(kind)[:20]
            raise GgufUnsupportedError(f"{path}: no GGUF for a SentencePiece-style tokenizer with a {shown} step")
    return prefix


def _special_ids(settings: dict, config: dict, tokens: list[str | None]) -> dict[str, int]:
    """bos/eos/unk/pad ids: the token tokenizer_config.json names, else the id config.json gives."""
    ids = {text: i for i, text in enumerate(tokens) if text is not None}
    found = {}
    for key in SPECIAL_KEYS:
        named = settings.get(f"{key}_token")
        if isinstance(named, dict):
            named = named.get("content")
        fallback = config.get(f"{key}_token_id")
        if isinstance(fallback, list) and fallback:
            fallback = fallback[0]
        if isinstance(named, str) and named in ids:
            found[key] = ids[named]
        elif type(fallback) is int and 0 <= fallback < len(tokens):
            found[key] = fallback
    return found


def _adds_specials(tokenizer: dict, settings: dict) -> tuple[bool, bool]:
    """Whether encoding adds a BOS first and an EOS last: tokenizer_config.json's flags, else the post-processor."""
    single = []
    post = tokenizer.get("post_processor")
    if isinstance(post, dict):
        steps = post.get("processors") if post.get("type") == "Sequence" else [post]
        for step in steps if isinstance(steps, list) else []:
            if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
                single = step.get("single") if isinstance(step.get("single"), list) else []
    first = bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    last = bool(single) and isinstance(single[-1], dict) and "SpecialToken" in single[-1]
    add_bos, add_eos = settings.get("add_bos_token"), settings.get("add_eos_token")
    return (add_bos if isinstance(add_bos, bool) else first), (add_eos if isinstance(add_eos, bool) else last)


def _chat_templates(model_dir: Path, settings: dict) -> dict[str, str]:
    """tokenizer_config.json's chat_template (one string, or a list of named ones), else chat_template.jinja."""
    value = settings.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        named = {}
        for entry in value:
            name, template = (entry.get("name"), entry.get("template")) if isinstance(entry, dict) else (None, None)
            if isinstance(name, str) and re.fullmatch(r"[\w-]{1,64}", name) and isinstance(template, str):
                named[name] = template
        return named
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        try:
            return {"default": read_small(jinja, str(model_dir), GgufError).decode()}
        except UnicodeDecodeError as failure:
            raise GgufError(f"{jinja}: not UTF-8 text ({failure.reason})") from None
    return {}
