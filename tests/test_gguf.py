"""GGUF files written from tiny checkpoints of each family, read back by the gguf package's reader and by
transformers' GGUF loader; refusals of what mergebot does not convert, in one line, leaving nothing behind."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergebot.errors import GgufError, GgufUnsupportedError
from mergebot.gguf.convert import GgufFile, write_gguf
from mergebot.gguf.shards import list_tensors
from mergebot.gguf.vocab import SPLITS
from mergebot.pipeline.gguf_check import compare_tensors
from tests import tiny_architectures
from tests.gguf_models import CHATML, FAMILIES, SPM_FAMILIES, VOCAB, build

TYPES = ("F16", "BF16", "Q8_0")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {family: build(family, root / family) for family in FAMILIES}


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("file_type", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_and_type_reads_back_with_its_tokenizer(models, tmp_path, family, file_type):
    written = write_gguf(models[family], tmp_path / f"tiny-{file_type}.gguf", file_type)
    assert written.size == written.path.stat().st_size and len(written.sha256) == 64
    assert [p.name for p in tmp_path.iterdir()] == [written.path.name]  # no temporary file left
    reader = gguf.GGUFReader(written.path)
    assert _field(reader, "general.architecture") == {"mistral": "llama"}.get(family, family)
    assert _field(reader, "general.name") == "tiny"
    names = {tensor.name: tensor for tensor in reader.tensors}
    assert names["token_embd.weight"].tensor_type.name == file_type
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert names["blk.2.ffn_down.weight"].tensor_type.name == file_type
    assert ("output.weight" in names) == (family not in ("gemma", "gemma2"))  # Gemma's output is its embedding
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert _field(reader, "tokenizer.chat_template") == CHATML
    if family in SPM_FAMILIES:
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
        assert types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE]
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
        assert len(_field(reader, "tokenizer.ggml.scores")) == VOCAB
    else:
        assert _field(reader, "tokenizer.ggml.model") == "gpt2"
        assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
        assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert types[tokens.index("<tool>")] == gguf.TokenType.USER_DEFINED
        assert types[tokens.index("<|im_end|>")] == gguf.TokenType.CONTROL
        assert _field(reader, "tokenizer.ggml.add_bos_token") is False
        assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2


@pytest.mark.parametrize(
    ("family", "file_type"), [*((f, "BF16") for f in FAMILIES), ("llama", "F16"), ("llama", "Q8_0"), ("qwen3", "Q8_0")]
)
def test_transformers_reads_back_the_merge_tensors(models, tmp_path, family, file_type):
    written = write_gguf(models[family], tmp_path / f"tiny-{family}-{file_type}.gguf", file_type)
    problem, checked, worst = compare_tensors(written, models[family])
    assert problem is None
    if family == "gemma":
        assert checked == 0 and "transformers reads no gemma GGUF" in worst
    else:
        assert checked == len(list_tensors(models[family])) and worst != "-"


def test_a_damaged_tensor_is_found_and_named(models, tmp_path):
    """The check can fail: one row of the q projection changed in the file is reported, for an exact type and
    for Q8_0."""
    for file_type in ("BF16", "Q8_0"):
        written = write_gguf(models["llama"], tmp_path / f"damaged-{file_type}.gguf", file_type)
        tensor = next(t for t in gguf.GGUFReader(written.path).tensors if t.name == "blk.1.attn_q.weight")
        with written.path.open("r+b") as handle:
            handle.seek(tensor.data_offset + 8)
            handle.write(b"\x7f\x7f\x7f\x7f")
        problem, _, _ = compare_tensors(written, models["llama"])
        assert problem is not None and "model.layers.1.self_attn.q_proj.weight" in problem and "\n" not in problem


def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path):
    model = tiny_architectures.build(tiny_architectures.ARCHITECTURES["phi3"], tmp_path / "phi3")
    out = tmp_path / "out"
    with pytest.raises(GgufUnsupportedError) as refusal:
        write_gguf(model, out / "phi3-Q8_0.gguf", "Q8_0")
    assert "Phi3ForCausalLM" in str(refusal.value) and "\n" not in str(refusal.value)
    assert not out.exists() or not list(out.iterdir())


def test_an_unknown_type_is_refused(models, tmp_path):
    with pytest.raises(GgufUnsupportedError, match="GGUF type Q3_X"):
        write_gguf(models["llama"], tmp_path / "x.gguf", "Q3_X")


def _copy(models: dict[str, Path], family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(models[family], tmp_path / family))


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(models, tmp_path):
    model = _copy(models, "qwen2", tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GgufUnsupportedError, match="pre-tokenizer"):
        write_gguf(model, tmp_path / "out" / "x.gguf", "BF16")
    assert not (tmp_path / "out").exists()


def test_known_pre_tokenizers_are_named_as_llama_cpp_names_them(models, tmp_path):
    model = _copy(models, "qwen2", tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    for regex, name in SPLITS.items():
        tokenizer["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
        (model / "tokenizer.json").write_text(json.dumps(tokenizer))
        written = write_gguf(model, tmp_path / f"{name}.gguf", "BF16")
        assert _field(gguf.GGUFReader(written.path), "tokenizer.ggml.pre") == {"llama3": "llama-bpe"}.get(name, name)


def test_hostile_files_are_refused_in_one_line(models, tmp_path):
    model = _copy(models, "llama", tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": VOCAB + 5, "content": "<x>", "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GgufError, match=f"token id {VOCAB + 5} is outside"):
        write_gguf(model, tmp_path / "a.gguf", "BF16")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1 << 30}))
    with pytest.raises(GgufError, match="num_hidden_layers is 1073741824, the shards hold 3"):
        write_gguf(model, tmp_path / "c.gguf", "BF16")
    (model / "config.json").write_text(json.dumps(config))
    shard = next(model.glob("*.safetensors"))
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    with pytest.raises(GgufError, match=r"inconsistent data offsets|truncated") as refusal:
        write_gguf(model, tmp_path / "b.gguf", "BF16")
    assert "\n" not in str(refusal.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_a_failed_conversion_keeps_the_previous_file(models, tmp_path):
    out = tmp_path / "kept.gguf"
    first = write_gguf(models["qwen2"], out, "Q8_0")
    model = _copy(models, "qwen2", tmp_path)
    (model / "tokenizer.json").unlink()
    with pytest.raises(GgufUnsupportedError, match=r"no tokenizer\.json"):
        write_gguf(model, out, "Q8_0")
    assert GgufFile(out, "Q8_0", out.stat().st_size, first.sha256) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf", "qwen2"]


def test_llama_q_and_k_rows_are_stored_as_llama_cpp_expects(models, tmp_path):
    """The permutation itself, against its definition: within each head, row i of the first half and row i of the
    second half become neighbours (llama.cpp's rotary pairs adjacent values)."""
    written = write_gguf(models["llama"], tmp_path / "perm.gguf", "F16")
    stored = next(t for t in gguf.GGUFReader(written.path).tensors if t.name == "blk.0.attn_k.weight")
    merged = {}
    for shard in models["llama"].glob("*.safetensors"):
        merged |= load_file(shard)
    k = merged["model.layers.0.self_attn.k_proj.weight"].to(torch.float16).numpy()
    head_dim = 32 // 4
    expected = np.concatenate(
        [np.stack([h[: head_dim // 2], h[head_dim // 2 :]], axis=1).reshape(head_dim, -1) for h in np.split(k, 2)]
    )
    assert np.array_equal(np.asarray(stored.data).reshape(expected.shape), expected)


def test_a_sentencepiece_style_tokenizer_that_lower_cases_is_refused(models, tmp_path):
    model = _copy(models, "gemma", tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["normalizers"].append({"type": "Lowercase"})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GgufUnsupportedError, match="SentencePiece-style tokenizer with a Lowercase step"):
        write_gguf(model, tmp_path / "x.gguf", "BF16")
